# Human verdict for the compare stage (blind A/B in Argilla).
# Included by the Makefile (`include mk/compare.mk`), which defines PY, RUN, ARGS, $(VENV)/.installed, MALLOC_DEBS and WITH_TCMALLOC.
# `make compare` itself is one of the Makefile's STAGES.
#
#   make compare-to-argilla [RUN=...]   push blind A/B pairs of runs/$(RUN)/compare's responses to Argilla
#   make compare-pull [RUN=...]         read the answers, add the human win rate to runs/$(RUN)/compare/report.md

.PHONY: compare-to-argilla compare-pull

compare-to-argilla: $(VENV)/.installed $(MALLOC_DEBS)
	$(WITH_TCMALLOC) $(PY) -m stages.compare_to_argilla --run $(RUN) $(ARGS)

compare-pull: $(VENV)/.installed $(MALLOC_DEBS)
	$(WITH_TCMALLOC) $(PY) -m stages.compare_pull --run $(RUN) $(ARGS)
