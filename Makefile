# The two commands of the README. Each installs what it needs first, so both work on a fresh clone.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test test-long test-fast bench

install:
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[test]"

# The main job on the embedded default data: phantom -> pre-train -> bank -> synthesize -> figures.
demo: install
	modalitybank demo --workdir runs/demo --scale tiny

LINT = ruff check custom tests flare_app setup.py

# The test suite (CI runs exactly this through .ci/run, then test-long): every test but the `long` ones.
test: install
	$(LINT)
	$(PYTHON) -m pytest -q -m "not long" --durations=12

# The whole runs of more than ~2 minutes each (committed jobs as they are, the whole benchmark at tiny).
test-long: install
	$(PYTHON) -m pytest -q -m long --durations=12

# The fast inner loop: the tests not marked slow or deploy (no NVFlare run, no bundle training).
test-fast: install
	$(LINT)
	$(PYTHON) -m pytest -q -m "not slow and not deploy"

# The figures of the README's results table.
bench: install
	modalitybank params --json
	modalitybank params --scale paper --json
	modalitybank bench layers --json
	modalitybank bench fl --json
