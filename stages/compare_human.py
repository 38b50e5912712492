"""Compare, human side: a blind A/B test of the compare run's responses in Argilla.

`action: push` (make compare-to-argilla)
    Consumes runs/<run>/compare/ (a finished compare stage: samples.jsonl, report.json)
    and an Argilla server (ARGILLA_API_URL/ARGILLA_API_KEY, or the local one of
    `make argilla`).
    Produces, in Argilla, the dataset `argilla_dataset` (default compare-<run>) in
    `argilla_workspace`: one record per (prompt, sample) and aligned model, the
    conversation and two responses as A and B, sides randomised per record, a required
    question A / B / tie; record ids are opaque hashes, so nothing an annotator sees
    names a model (align/ab_test.py). The responses are exactly the ones the reward
    model scored. Locally: runs/<run>/compare/ab_pairs.jsonl (which prompt, sample and
    models each record holds) and the dataset name in manifest.json. Pushing again
    updates the records, never duplicates them.

`action: pull` (make compare-pull)
    Consumes runs/<run>/compare/ after a push (ab_pairs.jsonl, the dataset name in
    manifest.json) and the submitted answers in Argilla.
    Produces the human win rate of each aligned model over the baseline (Wilson
    interval, ties apart) and how often the reward model agreed with the humans, added
    to runs/<run>/compare/report.md, report.html, report.json, win_rate.png and
    manifest.json (each file rewritten atomically, align/reports.py); the answers
    themselves in human_answers.jsonl. Sides are decoded from each record's metadata
    and checked against ab_pairs.jsonl. Run it again whenever more answers came in.

Both actions always run (no up-to-date check): they talk to a server whose records and
answers change without any local file changing. `--force` changes nothing.

Run: make compare-to-argilla [RUN=name] [ARGS="--argilla_samples_per_prompt 2"],
annotate in the Argilla UI, then make compare-pull [RUN=name].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from align import ab_test, argilla_io, comparison, files, reports, runs
from align.comparison import fmt_pct
from align.config import parse_stage_config
from align.console import run_stage, summary, warn
from align.errors import AlignError, ConfigError


@dataclass
class CompareHumanArgs:
    """Keys of configs/compare_human.yaml; `action` comes from the make target."""

    action: Literal["push", "pull"] = field(metadata={
        "help": "push: blind A/B pairs to Argilla | pull: the answers into the compare report"})
    run: str = field(default="default", metadata={"help": "run name: reads and updates runs/<run>/compare"})
    argilla_dataset: str | None = field(default=None, metadata={"help": "A/B dataset name (default compare-<run>)"})
    argilla_workspace: str = field(default="align", metadata={"help": "Argilla workspace"})
    argilla_samples_per_prompt: int = field(default=1, metadata={"help": "A/B pairs per prompt (sample 0, 1, ...)"})
    argilla_min_submitted: int = field(default=1, metadata={"help": "answers wanted per pair"})


def main(argv=None):
    (args,) = parse_stage_config("compare_human", (CompareHumanArgs,), argv)
    folder = runs.stage_dir(args.run, "compare")
    checkpoint = runs.read_checkpoint(folder)  # a finished compare stage, or a LineageError saying so
    if args.action == "push":
        push(args, folder)
    else:
        pull(args, folder, checkpoint.manifest.get("argilla"))


def push(args: CompareHumanArgs, folder) -> None:
    if args.argilla_samples_per_prompt < 1:
        raise ConfigError(f"argilla_samples_per_prompt: must be >= 1, got {args.argilla_samples_per_prompt}")
    results = json.loads((folder / reports.REPORT_JSON).read_text())
    rows = comparison.read_samples(folder)
    available = 1 + max(row["sample"] for row in rows)
    if args.argilla_samples_per_prompt > available:
        raise ConfigError(f"argilla_samples_per_prompt: {args.argilla_samples_per_prompt} asked, but the compare run "
                          f"drew {available} sample(s) per prompt ({folder / comparison.SAMPLES})")

    items, mapping, identical = [], [], 0
    for entry in results["comparisons"]:
        new_items, new_mapping, new_identical = ab_test.ab_items(
            args.run, rows, entry["aligned"], entry["baseline"], args.argilla_samples_per_prompt)
        items += new_items
        mapping += new_mapping
        identical += new_identical
    if not items:
        raise AlignError(f"{folder / comparison.SAMPLES}: every pair of responses is identical; nothing for humans to judge")
    name = args.argilla_dataset or f"compare-{args.run}"
    client = argilla_io.connect()

    def push_pairs() -> list:  # the dataset and its records, asked again if the server drops out
        dataset = ab_test.create_ab_dataset(client, name, args.argilla_workspace, min_submitted=args.argilla_min_submitted)
        return ab_test.push_ab_pairs(dataset, items)

    pushed = argilla_io.retrying(f"pushing {len(items)} A/B pairs to {args.argilla_workspace}/{name}", client.api_url,
                                 push_pairs)
    if len(pushed) != len(items):
        raise AlignError(f"Argilla accepted {len(pushed)} of {len(items)} records in dataset {name!r}; push again")

    files.write_jsonl(folder / ab_test.AB_PAIRS, mapping)
    info = {"dataset": name, "workspace": args.argilla_workspace, "url": client.api_url, "pairs": len(items),
            "identical_pairs_left_out": identical, "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    runs.update_manifest(folder, argilla=info)
    summary("compare-to-argilla", pushed=f"{len(items)} blind A/B pairs", identical_pairs_left_out=identical,
            dataset=name, workspace=args.argilla_workspace, url=client.api_url,
            next="annotate, then `make compare-pull`")


def pull(args: CompareHumanArgs, folder, pushed: dict | None) -> None:
    if not pushed or not (folder / ab_test.AB_PAIRS).is_file():
        raise AlignError(f"{folder}: no A/B pairs pushed from this compare run; run `make compare-to-argilla RUN={args.run}` first")
    mapping = files.read_jsonl_records(folder / ab_test.AB_PAIRS)
    name, workspace = pushed["dataset"], pushed["workspace"]

    client = argilla_io.connect()
    answers = argilla_io.retrying(f"pulling answers from {workspace}/{name}", client.api_url,
                                  lambda: ab_test.pull_ab_answers(client, name, workspace))
    for problem in answers.problems:
        warn(f"Argilla dataset {name}: record {problem['record_id']} by {problem['annotator']}: {problem['problem']} (left out)")
    if not answers:
        print(f"[compare-pull] no submitted answers yet in Argilla dataset {name!r} (workspace {workspace!r}); "
              "report unchanged", flush=True)
        return

    results = json.loads((folder / reports.REPORT_JSON).read_text())
    rows = comparison.read_samples(folder)
    lines = []
    for entry in results["comparisons"]:
        human = ab_test.human_comparison(list(answers), mapping, entry["aligned"], entry["baseline"],
                                         results["options"]["confidence"])
        entry["human"] = human
        if human:
            lines.append(f"[compare-pull] {entry['aligned']} vs {entry['baseline']}: human win rate "
                         f"{fmt_pct(human['rate'])} [{fmt_pct(human['low'])}, {fmt_pct(human['high'])}] "
                         f"({human['wins']} won, {human['losses']} lost, {human['ties']} ties; {human['answers']} "
                         f"answers on {human['pairs_answered']} of {human['pairs_pushed']} pairs); reward model "
                         f"agreed on {fmt_pct(human['reward_model_agreement'])} of the pairs humans decided")
    pulled_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["argilla"] = {**pushed, "pulled_at": pulled_at, "answers": len(answers), "problems": len(answers.problems)}
    files.write_jsonl(folder / ab_test.HUMAN_ANSWERS, list(answers))
    reports.write_compare_report(folder, results, rows)
    runs.update_manifest(
        folder, argilla={"pulled_at": pulled_at, "answers": len(answers)},
        metrics={f"{e['aligned']}_human_{key}": e["human"][key] for e in results["comparisons"] if e.get("human")
                 for key in ("rate", "low", "high", "wins", "ties", "losses")},
    )
    for line in lines:
        print(line, flush=True)
    summary("compare-pull", answers=len(answers), dataset=name, report=str(folder / reports.REPORT_MD))


if __name__ == "__main__":
    run_stage(main, single_process="it pushes to and pulls from Argilla once")
