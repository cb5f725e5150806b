# The two commands a user needs: `make install` and `make demo` (README.md); `make test` runs the suite.
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
DEMO_VAE ?= models/demo
DEMO_EBM ?= models/demo/ebm
DEMO_EBM_CD ?= models/demo/ebm-cd
DEMO_UNET ?= models/demo/unet
DEMO_EVALUATOR ?= models/demo/evaluator
DEMO_EBM_COMPOSE ?= models/demo/ebm-compose
# Output folders are keyed by the shipped weights (and the energy's config: its sampler), so pulling new models never
# meets a folder the old ones filled.
VAE_ID := $(shell sha256sum $(DEMO_VAE)/vae/diffusion_pytorch_model.safetensors 2>/dev/null | cut -c1-12)
EBM_ID := $(shell cat $(DEMO_EBM)/config.json $(DEMO_EBM)/model.safetensors 2>/dev/null | sha256sum | cut -c1-12)
EBM_CD_ID := $(shell sha256sum $(DEMO_EBM_CD)/model.safetensors 2>/dev/null | cut -c1-12)
EBM_COMPOSE_ID := $(shell sha256sum $(DEMO_EBM_COMPOSE)/model.safetensors 2>/dev/null | cut -c1-12)
# The emoji model (models/emoji): its energy, and the latents it trained on and held out (shipped compressed, unpacked
# into build/demo on first use).
EMOJI_MODEL ?= models/emoji
EMOJI_EBM_ID := $(shell cat $(EMOJI_MODEL)/ebm/config.json $(EMOJI_MODEL)/ebm/model.safetensors 2>/dev/null | sha256sum | cut -c1-12)
EMOJI_LATENTS_ID := $(shell sha256sum $(EMOJI_MODEL)/latents.tar.xz 2>/dev/null | cut -c1-12)
EMOJI_LATENTS ?= $(DEMO_DIR)/emoji-latents-$(EMOJI_LATENTS_ID)
EMOJI_GENERATED ?= $(DEMO_DIR)/emoji-$(EMOJI_EBM_ID)
# the held-out tenth's size: an evaluation scores as many samples as it has held-out images
EMOJI_IMAGES ?= 375
# A report's verdict, read from its first line (evaluation/markdown.py's verdict_line): "FAILED: 5 of 6 checks pass ..."
VERDICT_LINE := sed -n 's/^\*\*\([A-Z]*\)\*\*: \(.*\), verdict on .*/\1: \2/p'
# ... and the precompute config: a folder made under another config is refused on resume, never mixed.
PRECOMPUTE_ID := $(shell sha256sum configs/precompute-demo.yaml | cut -c1-8)
LATENTS ?= $(DEMO_DIR)/latents-$(VAE_ID)-$(PRECOMPUTE_ID)
GENERATED ?= $(DEMO_DIR)/generated-$(EBM_ID)
GENERATED_CD ?= $(DEMO_DIR)/generated-cd-$(EBM_CD_ID)
GENERATED_COMPOSE ?= $(DEMO_DIR)/conditional-$(EBM_COMPOSE_ID)

.PHONY: install install-run data-emoji emoji-dev emoji-models recipe hostile pareto demo demo-emoji demo-conditional demo-train demo-generate demo-models demo-refit-dependants test test-integration test-all lint bench capacity compare clean cluster-up cluster-down

# `install`: the library, the jobs and what the tests use (make test, make lint). `install-run`: the library and the
# jobs alone (cluster, inspect extras), all the demo and the benchmarks need.
install: $(VENV)/.installed
install-run: $(VENV)/.installed-run

$(VENV)/.torch:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; $(BIN)/pip install torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed-run

$(VENV)/.installed-run: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install -c constraints.txt -e '.[all]'
	touch $@

# The demo: 10k procedural images -> latents with the shipped demo VAE -> 1000 images from the shipped
# noise-conditional energy (from plain noise) and 1000 from the short-run CD model it replaced -> one evaluation in
# the shipped evaluator's feature space against the latent shard neither model trained on. Then the emoji model
# (real images: demo-emoji) and both verdict lines, one under the other.
# `make demo-train` first retrains the energy with the recipe the shipped one came from (configs/train-demo.yaml,
# 9,000 steps, about 83 minutes on 2 CPUs; the shipped weights trained on to 13,000: DEMO_TRAIN_ARGS="--max-steps
# 13000"; "--max-steps 3000" for a 25-minute version) and generates from that.
# `make demo-models` refits every shipped model (VAE, evaluator, the energies, the diffusion baseline, the
# conditional energy): about 5 hours.
demo: install-run
	$(BIN)/python -m jobs.demo_assets --output $(DEMO_DIR)
	$(BIN)/python -m jobs.precompute --config configs/precompute-demo.yaml \
		--input $(DEMO_DIR)/images --vae $(DEMO_VAE) --output $(LATENTS)
	$(BIN)/python -m jobs.generate --config configs/generate.yaml --model $(DEMO_EBM_CD) \
		--vae $(DEMO_VAE) --num-images 1000 --output $(GENERATED_CD)
	$(MAKE) --no-print-directory demo-generate DEMO_EBM=$(DEMO_EBM) LATENTS=$(LATENTS) GENERATED=$(GENERATED) \
		COMPARE="--compare $(GENERATED_CD)"
	$(BIN)/python -m jobs.inspect --model $(DEMO_EBM) --vae $(DEMO_VAE) --latents $(LATENTS) \
		--output $(GENERATED)-xray
	@echo "x-ray of the model and its chains: $(GENERATED)-xray/index.html"
	$(MAKE) --no-print-directory demo-conditional LATENTS=$(LATENTS)
	$(MAKE) --no-print-directory demo-emoji
	@echo
	@echo "shapes: $$($(VERDICT_LINE) $(GENERATED)-report/report.md)"
	@echo "emoji:  $$($(VERDICT_LINE) $(EMOJI_GENERATED)-report/report.md)"

# Real images: EMOJI_IMAGES (375) emoji from the shipped emoji energy (models/emoji, trained by the default
# configs), scored against the held-out 10% of the emoji set that ships with it.
demo-emoji: install-run
	test -f $(EMOJI_LATENTS)/manifest.json || { rm -rf $(EMOJI_LATENTS).part $(EMOJI_LATENTS) && \
		$(BIN)/python -W ignore::DeprecationWarning -m tarfile -e $(EMOJI_MODEL)/latents.tar.xz \
		$(EMOJI_LATENTS).part && mv $(EMOJI_LATENTS).part $(EMOJI_LATENTS); }
	$(BIN)/python -m jobs.generate --config configs/generate.yaml --model $(EMOJI_MODEL)/ebm \
		--vae $(EMOJI_MODEL) --num-images $(EMOJI_IMAGES) --output $(EMOJI_GENERATED)
	$(BIN)/python -m jobs.evaluate --generated $(EMOJI_GENERATED) --reference $(EMOJI_LATENTS) \
		--evaluator $(EMOJI_MODEL)/evaluator --output $(EMOJI_GENERATED)-report
	@echo "emoji run: $(EMOJI_GENERATED)-report/report.md (samples-vs-real.png: samples beside held-out real emoji)"

# The conditional energy (trained without any ring on a checker): each shape, each background, and the left-out
# combination by composition (configs/conditions-demo.yaml), scored per condition by the evaluator.
demo-conditional:
	$(BIN)/python -m jobs.generate --config configs/generate.yaml --model $(DEMO_EBM_COMPOSE) \
		--vae $(DEMO_VAE) --conditions configs/conditions-demo.yaml --output $(GENERATED_COMPOSE)
	$(BIN)/python -m jobs.evaluate --generated $(GENERATED_COMPOSE) --reference $(LATENTS) \
		--evaluator $(DEMO_EVALUATOR) --output $(GENERATED_COMPOSE)-report
	@echo "conditional run: $(GENERATED_COMPOSE)-report/report.md (conditions.png: 16 samples per condition)"

demo-train: install-run
	$(BIN)/python -m jobs.demo_assets --output $(DEMO_DIR)
	$(BIN)/python -m jobs.precompute --config configs/precompute-demo.yaml \
		--input $(DEMO_DIR)/images --vae $(DEMO_VAE) --output $(LATENTS)
	$(BIN)/python -m jobs.train --config configs/train-demo.yaml $(DEMO_TRAIN_ARGS) \
		--latents $(LATENTS) --output $(DEMO_DIR)/ebm --run-name demo-$(VAE_ID)
	$(MAKE) --no-print-directory demo-generate DEMO_EBM=$(DEMO_DIR)/ebm/model LATENTS=$(LATENTS) \
		GENERATED=$(DEMO_DIR)/generated-trained

demo-generate:
	$(BIN)/python -m jobs.generate --config configs/generate.yaml --model $(DEMO_EBM) \
		--vae $(DEMO_VAE) --num-images 1000 --output $(GENERATED)
	$(BIN)/python -m jobs.evaluate --generated $(GENERATED) --reference $(LATENTS) \
		--evaluator $(DEMO_EVALUATOR) --output $(GENERATED)-report $(COMPARE)
	@echo
	@echo "images (parquet + tar shards): $(GENERATED)/"
	@echo "preview:                       $(GENERATED)/preview.png"
	@echo "evaluation report:             $(GENERATED)-report/report.md (samples-vs-real.png, per-class.png beside it)"

# Refits the shipped demo models in order, into models/demo: the VAE (about 35 minutes on 2 CPUs), then latents
# with it, the evaluator that reads its decoder's images, both energies and the DDIM baseline (`git diff models/`
# shows what changed).
demo-models: install-run
	$(BIN)/python -m jobs.demo_assets --output $(DEMO_DIR)
	$(BIN)/python -m jobs.fit_vae --config configs/fit-vae-demo.yaml --input $(DEMO_DIR)/images \
		--output $(DEMO_DIR)/vae-fit
	rm -rf $(DEMO_VAE)/vae && cp -r $(DEMO_DIR)/vae-fit/vae \
		$(DEMO_DIR)/vae-fit/fit_vae.json $(DEMO_DIR)/vae-fit/reconstructions.png $(DEMO_VAE)/
	$(MAKE) --no-print-directory demo-refit-dependants

# A new make process, so VAE_ID is read from the VAE just copied.
demo-refit-dependants:
	$(BIN)/python -m jobs.precompute --config configs/precompute-demo.yaml \
		--input $(DEMO_DIR)/images --vae $(DEMO_VAE) --output $(LATENTS)
	$(BIN)/python -m jobs.fit_evaluator --config configs/fit-evaluator-demo.yaml \
		--latents $(LATENTS) --output $(DEMO_DIR)/evaluator-$(VAE_ID)
	$(BIN)/python -m jobs.train --config configs/train-demo.yaml \
		--latents $(LATENTS) --output $(DEMO_DIR)/ebm-$(VAE_ID) --run-name demo-$(VAE_ID)
	$(BIN)/python -m jobs.train --config configs/train-demo-cd.yaml \
		--latents $(LATENTS) --output $(DEMO_DIR)/ebm-cd-$(VAE_ID) --run-name demo-cd-$(VAE_ID)
	$(BIN)/python -m jobs.train --config configs/train-demo-ddpm.yaml \
		--latents $(LATENTS) --output $(DEMO_DIR)/unet-$(VAE_ID) --run-name demo-unet-$(VAE_ID)
	$(BIN)/python -m jobs.train --config configs/train-demo-compose.yaml \
		--latents $(LATENTS) --output $(DEMO_DIR)/ebm-compose-$(VAE_ID) --run-name demo-compose-$(VAE_ID)
	rm -rf $(DEMO_EVALUATOR) && cp -r $(DEMO_DIR)/evaluator-$(VAE_ID) $(DEMO_EVALUATOR)
	cp $(DEMO_DIR)/ebm-$(VAE_ID)/model/config.json $(DEMO_DIR)/ebm-$(VAE_ID)/model/model.safetensors $(DEMO_EBM)/
	cp $(DEMO_DIR)/ebm-cd-$(VAE_ID)/model/config.json $(DEMO_DIR)/ebm-cd-$(VAE_ID)/model/model.safetensors \
		$(DEMO_EBM_CD)/
	mkdir -p $(DEMO_UNET) && cp $(DEMO_DIR)/unet-$(VAE_ID)/model/config.json \
		$(DEMO_DIR)/unet-$(VAE_ID)/model/model.safetensors $(DEMO_UNET)/
	mkdir -p $(DEMO_EBM_COMPOSE) && cp $(DEMO_DIR)/ebm-compose-$(VAE_ID)/model/config.json \
		$(DEMO_DIR)/ebm-compose-$(VAE_ID)/model/model.safetensors $(DEMO_EBM_COMPOSE)/

# `test`: the suite but its long end-to-end tier (pytest -m integration), under 10 minutes on 2 CPUs; CI runs both.
test: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A real image set to develop training recipes on (bench/emoji_data.py): Google's Noto emoji (Apache-2.0), 64 px PNGs
# from the npm package emoji-datasource-google@16.0.0, one folder per category; `make test` never needs it.
EMOJI_DIR ?= build/emoji
data-emoji: install-run
	$(BIN)/python bench/emoji_data.py --output $(EMOJI_DIR)/images

# The emoji set made ready for recipe work, with the default configs: a VAE fitted with the demo VAE's recipe (about
# 35 minutes on 2 CPUs, as the demo's), latents (a random 10%, stratified by category, in a held-out shard; a
# latents folder from before that split is refused: precompute into a new one) and an evaluator.
emoji-dev: data-emoji
	$(BIN)/python -m jobs.fit_vae --config configs/fit-vae-demo.yaml --input $(EMOJI_DIR)/images --output $(EMOJI_DIR)/vae
	$(BIN)/python -m jobs.precompute --config configs/precompute.yaml --input $(EMOJI_DIR)/images \
		--vae $(EMOJI_DIR)/vae --output $(EMOJI_DIR)/latents --set resolution=64 --set min_side=32
	$(BIN)/python -m jobs.fit_evaluator --config configs/fit-evaluator.yaml --latents $(EMOJI_DIR)/latents \
		--output $(EMOJI_DIR)/evaluator

# Refits models/emoji's energy with the default training config (configs/train.yaml; EMOJI_TRAIN_ARGS="--set
# max_steps=N" sets the length: models/emoji/README.md gives the shipped one's) on the latents and evaluator that
# emoji-dev makes (or those EMOJI_LATENTS_DIR and EMOJI_EVALUATOR_DIR name), copies the VAE, the evaluator and the
# energy into models/emoji and packs the latents it trained on and held out into models/emoji/latents.tar.xz.
EMOJI_LATENTS_DIR ?= $(EMOJI_DIR)/latents
EMOJI_EVALUATOR_DIR ?= $(EMOJI_DIR)/evaluator
emoji-models: install-run
	test -f $(EMOJI_EVALUATOR_DIR)/config.json || $(MAKE) --no-print-directory emoji-dev
	$(BIN)/python -m jobs.train --config configs/train.yaml $(EMOJI_TRAIN_ARGS) --latents $(EMOJI_LATENTS_DIR) \
		--output $(EMOJI_DIR)/ebm --run-name emoji
	mkdir -p $(EMOJI_MODEL)/ebm && rm -rf $(EMOJI_MODEL)/vae $(EMOJI_MODEL)/evaluator
	cp -r $(EMOJI_DIR)/vae/vae $(EMOJI_DIR)/vae/fit_vae.json $(EMOJI_DIR)/vae/reconstructions.png \
		$(DEMO_VAE)/model_index.json $(DEMO_VAE)/ebd_pipeline.py $(EMOJI_MODEL)/
	cp -r $(EMOJI_EVALUATOR_DIR) $(EMOJI_MODEL)/evaluator
	cp $(EMOJI_DIR)/ebm/model/config.json $(EMOJI_DIR)/ebm/model/model.safetensors $(DEMO_EBM)/ebd_model.py \
		$(EMOJI_MODEL)/ebm/
	tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C $(EMOJI_LATENTS_DIR) \
		-cJf $(EMOJI_MODEL)/latents.tar.xz manifest.json $$(cd $(EMOJI_LATENTS_DIR) && ls latents-*.tar)

# Training recipes at equal training time (bench/recipe.md): each recipe change against today's on the shapes and,
# after `make emoji-dev`, on the emoji set. RECIPE_ARGS narrows it, e.g. RECIPE_ARGS="--recipes baseline,edm".
RECIPE_STEPS ?= 1000
recipe: install-run
	test -f $(LATENTS)/manifest.json || $(MAKE) --no-print-directory demo
	$(BIN)/python bench/recipe.py --data shapes --latents $(LATENTS) --vae $(DEMO_VAE) --evaluator $(DEMO_EVALUATOR) \
		--steps $(RECIPE_STEPS) $(RECIPE_ARGS)
	if test -f $(EMOJI_DIR)/evaluator/config.json; then $(BIN)/python bench/recipe.py --data emoji \
		--latents $(EMOJI_DIR)/latents --vae $(EMOJI_DIR)/vae --evaluator $(EMOJI_DIR)/evaluator \
		--steps $(RECIPE_STEPS) $(RECIPE_ARGS); fi

# The layer contracts of pipeline/ (pyproject.toml [tool.importlinter]) and the lint; CI runs it before the tests.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check pipeline jobs tests bench

# Writes bench/out/*.json, then bench/results.json and the table bench/results.md; `make capacity` writes
# bench/capacity.md (stage costs, the prediction for a cluster shape, checked on a local two-node cluster).
bench: install-run
	$(BIN)/python bench/precompute.py --images 1920
	$(BIN)/python bench/train.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/report.py

# What each hostile input costs the real precompute job (tests/hostile_corpus.py at a larger scale): outcome, wall time
# and the job's peak memory against 20 good images, and each decoder's bytes per pixel (bench/hostile.md).
hostile: install-run
	$(BIN)/python bench/hostile.py

capacity: install-run
	$(BIN)/python bench/capacity.py

# One table: the energy models beside the DDIM baseline, images/s and quality on the same latents, decoder and
# cores (bench/compare.md and bench/out/compare.json; about 15 minutes on 2 CPUs after `make demo`).
compare: install-run
	test -f $(LATENTS)/manifest.json || $(MAKE) --no-print-directory demo
	$(BIN)/python bench/compare.py --latents $(LATENTS)

# Quality against compute: every model x solver at 5-50 network evaluations per image, scored in one evaluation
# (bench/pareto.md, bench/pareto.png; hours on 2 CPUs: points land in build/bench/pareto-rows.jsonl, so a re-run
# resumes; PARETO_ARGS="--evaluations 10,15 --solvers dpmpp_2m" narrows it).
pareto: install-run
	test -f $(LATENTS)/manifest.json || $(MAKE) --no-print-directory demo
	$(BIN)/python bench/pareto.py --latents $(LATENTS) $(PARETO_ARGS)

# A two-node Ray cluster on this machine (head + worker on 127.0.0.1, metrics export ports 8080/8081).
cluster-up: install-run
	cluster/local.sh start

cluster-down:
	cluster/local.sh stop

clean:
	rm -rf build .pytest_cache
