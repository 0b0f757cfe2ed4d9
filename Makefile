# merlin-molar: `make quickstart` runs the main job end to end, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(wildcard ../shared/data/ml-100k),../shared/data/ml-100k,)

.PHONY: install test test-fast lint quickstart

$(VENV)/.installed: requirements/lock.txt requirements/merlin.txt requirements/serving.txt requirements/serving-stub.txt setup.cfg scripts/install.sh scripts/install_serving.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

# Both tiers: tests/unit (synthetic data, seconds) and tests/integration (real MovieLens, torchrun, Dask,
# tritonserver). This is the README's and CI's test command.
test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

# The edit-test loop: the unit tier only (no ../shared, no subprocesses).
test-fast: install
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

quickstart: install
	$(VENV)/bin/merlin-molar quickstart $(if $(DATA),--data $(DATA),)
