# Two commands do everything on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
VARIANT ?= cpu
STAMP   := $(VENV)/.spac-setup

.PHONY: setup run test build-llama clean

setup: $(STAMP) build-llama

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Patched llama-cpp-python from the pinned sdist; cached by (sdist, patches, variant): seconds when unchanged.
build-llama: $(STAMP)
	$(VPY) scripts/build_llama.py --variant $(VARIANT)

run: setup
	$(VENV)/bin/spac-gguf run -n 64 -p "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"

test: setup
	$(VPY) -m ruff check spac_gguf scripts tests
	$(VPY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
