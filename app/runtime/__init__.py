"""Process plumbing: cli, procs, supervisor, embedded engine, rq worker class, maintenance, wsgi."""
