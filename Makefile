# Two commands for a newcomer: `make demo` runs every stage on built-in phantom data,
# `make test` runs the test suite. Both create .venv and install requirements.txt first.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
SYSTEM_PYTHON ?= python3

.PHONY: demo test install

install: $(STAMP)

# Re-install only when requirements.txt changes (the stamp is newer than it otherwise). A GPU build of
# TensorFlow installed as the README says is kept: requirements.txt's tensorflow-cpu would overwrite it.
$(STAMP): requirements.txt
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	if $(PYTHON) -m pip show tensorflow > /dev/null 2>&1; then \
		grep -v '^tensorflow-cpu==' requirements.txt > $(VENV)/requirements-beside-gpu-build.txt; \
		$(PYTHON) -m pip install --quiet -r $(VENV)/requirements-beside-gpu-build.txt; \
	else \
		$(PYTHON) -m pip install --quiet -r requirements.txt; \
	fi
	touch $(STAMP)

# The formatter and the linter first (configured in pyproject.toml): seconds, and a failure names the line.
# The tests run in one process per core, a test file per process (its module fixtures built once):
# most of a test is a subprocess starting TensorFlow, busy on one core, so a second core overlaps them.
# The files are handed out longest first (tests/conftest.py), not by their number of tests.
test: $(STAMP)
	$(PYTHON) -m ruff format --check --quiet .
	$(PYTHON) -m ruff check --quiet .
	$(PYTHON) -m pytest -q --numprocesses=auto --dist=loadfile --no-loadscope-reorder tests

demo: $(STAMP)
	$(PYTHON) Scripts/demo.py
