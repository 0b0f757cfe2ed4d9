# merlin-molar: `make quickstart` runs the main job end to end, `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(wildcard ../shared/data/ml-100k),../shared/data/ml-100k,)

.PHONY: install test quickstart

$(VENV)/.installed: requirements/lock.txt requirements/merlin.txt requirements/serving.txt requirements/serving-stub.txt setup.cfg scripts/install.sh scripts/install_serving.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

quickstart: install
	$(VENV)/bin/merlin-molar quickstart $(if $(DATA),--data $(DATA),)
