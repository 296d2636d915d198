# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: install test demo wilds-demo clean

# make demo [DATA=existing data set] [OUT=output folder]
OUT ?= demo
DATA ?=

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib || echo "no matplotlib: training curves are skipped"
	$(PY) demo.py --out $(OUT) $(if $(DATA),--data $(DATA))

# the RxRx1-WILDS path (both recipes, their per-cell-type table) on a synthetic set: make wilds-demo [OUT=dir]
wilds-demo: install
	$(PY) wilds_demo.py --out $(if $(filter demo,$(OUT)),wilds-demo,$(OUT)) $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) .pytest_cache
