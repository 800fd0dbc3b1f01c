# The two commands: `make run` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test lint bench chaos clean chromium lock

# Python 3.11+ (pyproject's requires-python): an older or missing $(PY) is named, with the fix.
$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "xiaoyi needs Python 3.11 or newer, and $(PY) is $$($(PY) --version 2>/dev/null || \
	  echo 'not found'): name one with PY, e.g. make run PY=python3.11" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# Installs are reproducible: the exact versions of requirements*.lock (made by `make lock` from
# pyproject.toml), then the app itself without resolving anything again.
$(RUN_STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(DEV_STAMP): pyproject.toml requirements-dev.lock | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@ $(RUN_STAMP)

# Re-resolve the lock files after changing pyproject.toml (keeps the pinned versions it can).
lock: | $(BIN)/python
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 -q \
	  --custom-compile-command "make lock" -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 -q \
	  --custom-compile-command "make lock" -o requirements-dev.lock

# make run PORT=8080 HOST=0.0.0.0 ARGS="--workers 4": anything in ARGS goes to `xiaoyi run`.
PORT ?= 8000
HOST ?= 127.0.0.1
ARGS ?=

run: $(RUN_STAMP)
	$(BIN)/xiaoyi run --host $(HOST) --port $(PORT) $(ARGS)

# ruff over all the code; mypy strict over app/, workers/ and fakes/ (pyproject.toml [tool.mypy]).
lint: $(DEV_STAMP)
	$(BIN)/ruff check app workers tests bench tools fakes
	$(BIN)/mypy

# The whole suite, the fault injections and the Redis Cluster tests included (about 4–6 minutes
# on 2 cores).
# compileall first: the suite starts a hundred-odd `xiaoyi`, gunicorn and rq processes, and
# where PYTHONDONTWRITEBYTECODE is set (or on a fresh clone) each compiled the app's sources
# anew; Python reads .pyc files under that variable, it only never writes them.
test: $(DEV_STAMP) lint chromium
	$(BIN)/python -m compileall -q app workers fakes tests >/dev/null
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "chaos or not chaos" -rs

# Debian's Chromium for the admin page's browser test (skipped with a reason when not installable).
chromium:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1) \
	  || echo "chromium not installable: tests/test_admin_browser.py will skip"

bench: $(DEV_STAMP)
	$(BIN)/python bench/run.py

chaos: $(DEV_STAMP)
	$(BIN)/python -m compileall -q app workers fakes tests >/dev/null
	$(BIN)/python -m pytest -n 2 --dist loadfile -m chaos tests

clean:
	rm -rf $(VENV) var .pytest_cache
