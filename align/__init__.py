"""align: a staged RLHF / preference-alignment pipeline.

The library behind `stages/*.py`: config, runs and manifests, data formats,
models, generation backends, scoring, Argilla, evaluation. See docs/design.md.
"""

__version__ = "0.1.0"
