"""Compare, human side (1/2): push blind A/B pairs of the compare run's responses to Argilla.

Consumes runs/<run>/compare/ (a finished compare stage: samples.jsonl, report.json)
and an Argilla server (ARGILLA_API_URL/ARGILLA_API_KEY, or the local one of `make argilla`).

Produces, in Argilla, the dataset `argilla_dataset` (default compare-<run>) in
`argilla_workspace`: one record per (prompt, sample) and aligned model, showing the
conversation and two responses as A and B, sides randomised per record
(align.argilla_io.ab_sides), with a required question A / B / tie. Record ids are
opaque hashes, so nothing an annotator sees names a model. The responses are exactly
the ones the reward model scored. Locally: runs/<run>/compare/ab_pairs.jsonl (which
prompt, sample and models each record holds) and the dataset name in manifest.json.
Pushing again updates the records, never duplicates them.

Run: make compare-to-argilla [RUN=name] [ARGS="--argilla_samples_per_prompt 2"]
Then annotators answer in the Argilla UI, and `make compare-pull` adds their verdict.
"""

import json
from datetime import datetime, timezone

from align import argilla_io, comparison, files, runs
from align.comparison import CompareArgillaArgs, CompareArgs
from align.config import parse_stage_config
from align.console import run_stage, summary
from align.errors import AlignError, ConfigError


def main(argv=None):
    args, ab = parse_stage_config("compare", (CompareArgs, CompareArgillaArgs), argv)
    if ab.argilla_samples_per_prompt < 1:
        raise ConfigError(f"argilla_samples_per_prompt: must be >= 1, got {ab.argilla_samples_per_prompt}")
    folder = runs.stage_dir(args.run, "compare")
    runs.read_checkpoint(folder)  # a finished compare stage, or a LineageError saying so
    results = json.loads((folder / comparison.REPORT_JSON).read_text())
    rows = comparison.read_samples(folder)
    available = 1 + max(row["sample"] for row in rows)
    if ab.argilla_samples_per_prompt > available:
        raise ConfigError(f"argilla_samples_per_prompt: {ab.argilla_samples_per_prompt} asked, but the compare run "
                          f"drew {available} sample(s) per prompt ({folder / comparison.SAMPLES})")  # fmt: skip

    items, mapping, identical = [], [], 0
    for entry in results["comparisons"]:
        new_items, new_mapping, new_identical = comparison.ab_items(
            args.run, rows, entry["aligned"], entry["baseline"], ab.argilla_samples_per_prompt)  # fmt: skip
        items += new_items
        mapping += new_mapping
        identical += new_identical
    if not items:
        raise AlignError(f"{folder / comparison.SAMPLES}: every pair of responses is identical; nothing for humans to judge")
    name = ab.argilla_dataset or f"compare-{args.run}"
    client = argilla_io.connect()
    dataset = argilla_io.create_ab_dataset(client, name, ab.argilla_workspace, min_submitted=ab.argilla_min_submitted)
    pushed = argilla_io.push_ab_pairs(dataset, items)
    if len(pushed) != len(items):
        raise AlignError(f"Argilla accepted {len(pushed)} of {len(items)} records in dataset {name!r}; push again")

    files.write_jsonl(folder / comparison.AB_PAIRS, mapping)
    info = {"dataset": name, "workspace": ab.argilla_workspace, "url": client.api_url, "pairs": len(items),
            "identical_pairs_left_out": identical, "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    runs.update_manifest(folder, argilla=info)
    summary("compare-to-argilla", pushed=f"{len(items)} blind A/B pairs", identical_pairs_left_out=identical,
            dataset=name, workspace=ab.argilla_workspace, url=client.api_url,
            next="annotate, then `make compare-pull`")  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
