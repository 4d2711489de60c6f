PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-fast lint demo eval bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	command -v ffmpeg >/dev/null || { apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; }  # dr data media
	$(BIN)/pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,deepspeed,serve]'
	$(BIN)/pip install -q --no-deps imagebind-unofficial==0.1.1
	$(BIN)/python -m eval.wordnet

# The README's test command: fast tests, then the slow end-to-end ones (tiny models that must learn).
test:
	$(BIN)/python -m pytest -q -m 'not slow'
	$(BIN)/python -m pytest -q -m slow

test-fast:
	$(BIN)/python -m pytest -q -m 'not slow'

lint:
	$(BIN)/ruff check deepresonance_cli model eval ckpt tests benchmarks demo
	$(BIN)/ruff format --check deepresonance_cli model eval ckpt tests benchmarks demo

demo:
	$(BIN)/dr demo

eval:
	$(BIN)/dr eval $(PRED) --dataset $(DATASET)

clean:
	rm -rf $(VENV) .pytest_cache
