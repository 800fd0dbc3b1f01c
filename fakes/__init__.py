"""Fakes of the outside world for demos, tests and benchmarks (not part of the app)."""
