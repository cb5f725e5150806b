# The two commands a user needs: `make demo` and `make test`. See README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch for machines without an NVIDIA GPU. Elsewhere point pip at the CPU wheel index,
# e.g. `make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`.
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# `make VENV_FLAGS=--system-site-packages` reuses a torch (e.g. a CUDA build) installed system-wide.
VENV_FLAGS ?=
DEMO_DIR ?= build/demo

.PHONY: install demo test bench clean cluster-up cluster-down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; $(BIN)/pip install torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: install
	$(BIN)/python -m jobs.demo_assets --output $(DEMO_DIR)
	$(BIN)/python -m jobs.precompute --config configs/precompute-demo.yaml \
		--input $(DEMO_DIR)/images --vae $(DEMO_DIR)/sd-tiny --output $(DEMO_DIR)/latents
	$(BIN)/python -m jobs.train --config configs/train-demo.yaml \
		--latents $(DEMO_DIR)/latents --output $(DEMO_DIR)/ebm --run-name demo
	$(BIN)/python -m jobs.generate --config configs/generate.yaml --model $(DEMO_DIR)/ebm/model \
		--vae $(DEMO_DIR)/sd-tiny --num-images 1000 --output $(DEMO_DIR)/generated

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/precompute.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/generate.py

# A two-node Ray cluster on this machine (head + worker on 127.0.0.1, metrics export ports 8080/8081).
cluster-up: install
	cluster/local.sh start

cluster-down:
	cluster/local.sh stop

clean:
	rm -rf build .pytest_cache
