"""Compare, human side (2/2): read the blind A/B answers and add the human verdict to the report.

Consumes runs/<run>/compare/ (after `make compare-to-argilla`: ab_pairs.jsonl and the
dataset name in manifest.json) and the submitted answers in Argilla.

Produces: the human win rate of each aligned model over the baseline, with its Wilson
interval and ties apart, and how often the reward model agreed with the humans, added
to runs/<run>/compare/report.md, report.html, report.json, win_rate.png and
manifest.json (each file rewritten atomically); the answers themselves in
human_answers.jsonl. Sides are decoded from each record's metadata and checked
against the local ab_pairs.jsonl. Run it again whenever more answers came in.

Run: make compare-pull [RUN=name]
"""

import json
from datetime import datetime, timezone

from align import argilla_io, comparison, files, runs
from align.comparison import CompareArgillaArgs, CompareArgs
from align.config import parse_stage_config
from align.console import run_stage, summary, warn
from align.errors import AlignError

HUMAN_ANSWERS = "human_answers.jsonl"


def main(argv=None):
    args, ab = parse_stage_config("compare", (CompareArgs, CompareArgillaArgs), argv)
    folder = runs.stage_dir(args.run, "compare")
    checkpoint = runs.read_checkpoint(folder)
    pushed = checkpoint.manifest.get("argilla")
    if not pushed or not (folder / comparison.AB_PAIRS).is_file():
        raise AlignError(f"{folder}: no A/B pairs pushed from this compare run; run `make compare-to-argilla RUN={args.run}` first")
    mapping = files.read_jsonl_records(folder / comparison.AB_PAIRS)
    name, workspace = pushed["dataset"], pushed["workspace"]

    client = argilla_io.connect()
    answers = argilla_io.pull_ab_answers(client, name, workspace)
    for problem in answers.problems:
        warn(f"Argilla dataset {name}: record {problem['record_id']} by {problem['annotator']}: {problem['problem']} (left out)")
    if not answers:
        print(f"[compare-pull] no submitted answers yet in Argilla dataset {name!r} (workspace {workspace!r}); "
              "report unchanged", flush=True)  # fmt: skip
        return

    results = json.loads((folder / comparison.REPORT_JSON).read_text())
    rows = comparison.read_samples(folder)
    lines = []
    for entry in results["comparisons"]:
        human = comparison.human_comparison(list(answers), mapping, entry["aligned"], entry["baseline"],
                                            results["options"]["confidence"])  # fmt: skip
        entry["human"] = human
        if human:
            lines.append(f"[compare-pull] {entry['aligned']} vs {entry['baseline']}: human win rate "
                         f"{comparison.fmt_pct(human['rate'])} [{comparison.fmt_pct(human['low'])}, "
                         f"{comparison.fmt_pct(human['high'])}] ({human['wins']} won, {human['losses']} lost, "
                         f"{human['ties']} ties; {human['answers']} answers on {human['pairs_answered']} of "
                         f"{human['pairs_pushed']} pairs); reward model agreed on "
                         f"{comparison.fmt_pct(human['reward_model_agreement'])} of the pairs humans decided")  # fmt: skip
    pulled_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["argilla"] = {**pushed, "pulled_at": pulled_at, "answers": len(answers), "problems": len(answers.problems)}
    files.write_jsonl(folder / HUMAN_ANSWERS, list(answers))
    comparison.write_outputs(folder, results, rows)
    runs.update_manifest(
        folder, argilla={"pulled_at": pulled_at, "answers": len(answers)},
        metrics={f"{e['aligned']}_human_{key}": e["human"][key] for e in results["comparisons"] if e.get("human")
                 for key in ("rate", "low", "high", "wins", "ties", "losses")},
    )  # fmt: skip
    for line in lines:
        print(line, flush=True)
    summary("compare-pull", answers=len(answers), dataset=name, report=str(folder / comparison.REPORT_MD))


if __name__ == "__main__":
    run_stage(main)
