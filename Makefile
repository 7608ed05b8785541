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

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest $(ARGS)

lint: install-dev
	$(PY) -m ruff check .

clean:
	rm -rf .venv data
