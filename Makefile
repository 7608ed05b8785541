# PrefLoop. `make demo` runs the app on the embedded model; `make test` runs the tests.
# Both build .venv first when needed (scripts/install.sh is idempotent: seconds when up to date).
PY := .venv/bin/python
ARGS ?=

.PHONY: install install-dev demo test lint bench clean

install:
	@bash scripts/install.sh

install-dev:
	@bash scripts/install.sh --dev

demo: install
	$(PY) app.py $(ARGS)

# Two pytest workers, a test file each at a time, the closed loop first (tests/conftest.py): the
# suite's vLLM starts, subprocess imports and browser waits leave a core idle much of the time.
test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

lint: install-dev
	$(PY) -m ruff check .

clean:
	rm -rf .venv data
