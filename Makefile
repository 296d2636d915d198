# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: install test demo wilds-demo clean mutation

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

# make mutation [MODULES="plates knn"] [JOBS=2]: mutation testing of the scientific core (1-1.5
# hours on 2 cores; not part of `make test` or CI), writes benchmarks/MUTATION.md. mutmut lives in its
# own venv, which sees the project's packages through a .pth file: .venv itself is never changed
# (built by `make install` if missing, otherwise left exactly as it is).
MUTVENV := .venv-mutation
MUTSTAMP := $(MUTVENV)/.installed-mutmut-3.8.1
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
MODULES ?=

$(MUTSTAMP):
	test -x $(PY) || $(MAKE) install
	test -x $(MUTVENV)/bin/python || $(PY) -m venv $(MUTVENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(MUTVENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_project_venv.pth"
	$(MUTVENV)/bin/python -m pip install --disable-pip-version-check -q mutmut==3.8.1
	touch $@

mutation: $(MUTSTAMP)
	$(MUTVENV)/bin/python benchmarks/mutation.py --jobs $(JOBS) $(foreach m,$(MODULES),--module $(m))

clean:
	rm -rf $(VENV) $(MUTVENV) mutants .pytest_cache
