# Test oracles: old library releases the tests compare our hand-written code against.
# Included by the Makefile (`include mk/oracles.mk`, hooked into `test-deps`), which defines PY and INSTALLED.
#
#   make oracle-deps   TRL 1.12.0, the last release with `trl.experimental.ppo` (TRL 1.13 removed PPO),
#                      as an overlay folder: tests/test_ppo_oracle.py runs it in a subprocess with
#                      PYTHONPATH=<folder>, shadowing the venv's TRL 1.16. --no-deps: it reuses the
#                      venv's torch/transformers/accelerate and never touches the venv itself.
#
# The folder lives in the align cache ($ALIGN_CACHE, default ~/.cache/align), as align.files.cache_dir().

PY           ?= .venv/bin/python
ALIGN_CACHE  ?= $(HOME)/.cache/align
TRL_ORACLE_VERSION := 1.12.0
TRL_ORACLE   := $(ALIGN_CACHE)/oracles/trl-$(TRL_ORACLE_VERSION)

.PHONY: oracle-deps

oracle-deps: $(TRL_ORACLE)/.installed

# Stamped: pip runs once; a failed install leaves no stamp (and a fresh target folder next time).
# Order-only on the venv's stamp (the Makefile's INSTALLED; empty when this file runs alone):
# the venv's pip must exist, but a reinstalled venv does not change a --no-deps overlay.
$(TRL_ORACLE)/.installed: requirements/oracles.txt | $(INSTALLED)
	@rm -rf $(TRL_ORACLE) && mkdir -p $(dir $(TRL_ORACLE))
	$(PY) -m pip install -q --no-deps --require-hashes --target $(TRL_ORACLE) -r requirements/oracles.txt
	@touch $@
