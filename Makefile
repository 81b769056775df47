# Entry points the README documents. Every target runs setup first; setup is idempotent and quick once done.
VENV := .venv

.PHONY: setup serve test

setup:
	scripts/setup.sh

serve: setup
	$(VENV)/bin/kvcompact serve

# pytest exits 5 when it collects no tests; make fails on any non-zero status, so that counts as a failure.
test: setup
	$(VENV)/bin/python -m pytest -q
