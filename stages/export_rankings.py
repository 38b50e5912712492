"""Export the rankings annotators submitted in Argilla: Argilla's own format, ours and TRL's.

Consumes
    - an Argilla ranking dataset (`argilla_dataset` in `argilla_workspace`; default
      `<run>-candidates`, what `make candidates` pushes), on the server named by
      ARGILLA_API_URL/ARGILLA_API_KEY, else the local one of `make argilla`

Produces runs/<run>/rankings/ (written whole or not at all, like every stage):
    argilla/        Argilla's export of the dataset (`Dataset.to_disk`: settings, records and
                    responses); `rg.Dataset.from_disk(path)` re-creates it on any Argilla server
    rankings.jsonl  one line per annotator per record in the ranked format (data/README.md):
                    `make reward ARGS="--ranked_files runs/<run>/rankings/rankings.jsonl"`
    pairs/          a Hugging Face `datasets` folder (`datasets.load_from_disk`) of the preference
                    pairs the reward stage would build from them (same `ties`, `aggregation`,
                    `bad_rankings` rules, align/preferences.py), in TRL's conversational preference
                    format: prompt (messages), chosen and rejected (one assistant message each),
                    plus prompt_id, margin and tie
    manifest.json   the dataset and server, counts, annotators and agreement
With `push_to_hub <owner>/<name>` the pairs also go to that hub dataset repo (needs
HF_HUB_OFFLINE=0 and a token; refused before anything is pulled otherwise).

Always runs (never "up to date"): what the server holds can change at any time.

Run: make export-rankings [RUN=name] [ARGS="--argilla_dataset my-candidates --push_to_hub you/name"]
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from align import argilla_io, data, files, hub, preferences, runs
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn
from align.errors import AlignError
from align.preferences import Aggregation, BadRankingPolicy, TieMode

USAGE = 'make export-rankings [RUN=name] ARGS="--push_to_hub <owner>/<name>" HF_HUB_OFFLINE=0'


@dataclass
class ExportRankingsArgs:
    run: str = field(default="default", metadata={"help": "run name: outputs go to runs/<run>/rankings"})
    argilla_dataset: str | None = field(default=None, metadata={"help": "the ranking dataset; default <run>-candidates"})
    argilla_workspace: str = field(default="align", metadata={"help": "its workspace"})
    ties: TieMode = field(default="drop", metadata={"help": "pairs from tied responses: drop | soft"})
    aggregation: Aggregation = field(default="mean_rank", metadata={"help": "several annotators: mean_rank | majority"})
    bad_rankings: BadRankingPolicy = field(default="skip", metadata={"help": "skip | refuse"})
    push_to_hub: str | None = field(default=None, metadata={"help": "also push the pairs to this hub dataset repo"})
    private: bool = field(default=False, metadata={"help": "create the hub repo private"})


def main(argv=None):
    (args,) = parse_stage_config("export_rankings", (ExportRankingsArgs,), argv)
    name = args.argilla_dataset or f"{args.run}-candidates"
    where = f"{args.argilla_workspace}/{name}"
    token = None
    if args.push_to_hub:  # refused offline or without a token before the server is even asked
        hub.check_repo(args.push_to_hub, USAGE)
        token = hub.hub_token("make export-rankings")

    client = argilla_io.connect()
    dataset = argilla_io.retrying(f"finding {where}", client.api_url,
                                  lambda: argilla_io.find_dataset(client, name, args.argilla_workspace))
    pulled = argilla_io.retrying(f"pulling rankings from {where}", client.api_url,
                                 lambda: argilla_io.pull_rankings(client, name, args.argilla_workspace))
    for problem in getattr(pulled, "problems", []):
        warn(f"argilla {where} record {problem['record_id']} ({problem['annotator']}): {problem['problem']}; left out")
    if not pulled:
        raise AlignError(f"Argilla dataset {where}: no submitted rankings yet; annotate first (`make argilla-status` "
                         "shows who has submitted what)")
    final = runs.stage_dir(args.run, "rankings") / "rankings.jsonl"  # where the records' sources point
    records = [data.ranked_record(final, line, row) for line, row in enumerate(pulled, start=1)]
    pairs, report = preferences.ranked_to_pairs(records, args.ties, args.aggregation, args.bad_rankings)

    with runs.stage_output(args.run, "rankings", resolved_config(args), seed=None) as out:
        argilla_io.retrying(f"exporting {where}", client.api_url,
                            lambda: export_argilla(dataset, out.path / "argilla"))
        files.write_jsonl(out.path / "rankings.jsonl", [without_source(record) for record in records])
        pair_set = trl_preference_dataset(pairs)
        pair_set.save_to_disk(str(out.path / "pairs"))
        out.set(argilla={"dataset": name, "workspace": args.argilla_workspace, "url": client.api_url},
                outputs={"argilla": "argilla", "rankings": "rankings.jsonl", "pairs": "pairs"})
        out.metrics.update(**report.as_metrics(), rankings=len(records))
    url = None
    if args.push_to_hub:
        url = hub.upload_folder(out.path / "pairs", args.push_to_hub, token, args.private,
                                f"align rankings of Argilla {where}", repo_type="dataset")
        runs.update_manifest(out.path, hub={"repo": args.push_to_hub, "url": url})
    summary("export-rankings", rankings=len(records), pairs=len(pairs), prompts=report.prompts,
            annotators=len({record["annotator"] for record in records}), output=str(out.path),
            **({"hub": url} if url else {}))


def export_argilla(dataset, folder) -> None:
    """Argilla's own export into `folder` (a retried attempt starts from an empty folder)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)  # the SDK wants the folder to exist and be empty
    dataset.to_disk(str(folder))


def trl_preference_dataset(pairs: list[dict]):
    """TRL's conversational preference format (what DPOTrainer and RewardTrainer read)."""
    from datasets import Dataset

    rows = [{"prompt_id": pair["prompt_id"], "prompt": pair["prompt"],
             "chosen": [{"role": "assistant", "content": pair["chosen"]}],
             "rejected": [{"role": "assistant", "content": pair["rejected"]}],
             "margin": float(pair["margin"]), "tie": bool(pair.get("tie", False))} for pair in pairs]
    return Dataset.from_list(rows)


def without_source(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "source"}


if __name__ == "__main__":
    run_stage(main, uses_torch=False, single_process="it pulls from Argilla once")
