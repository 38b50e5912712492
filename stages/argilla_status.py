"""Show annotation progress on the Argilla server, per dataset.

Consumes: the server named by ARGILLA_API_URL/ARGILLA_API_KEY, else the local
  one from `make argilla` (.argilla/credentials.json).
Produces: a table on stdout (or JSON with --json): per dataset its records
  (total, completed = reached the dataset's min_submitted, pending) and per
  annotator the responses submitted, discarded and left as draft.

    make argilla-status
    python -m stages.argilla_status [--json]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from align.argilla_io import connect, dataset_status
from align.config import parse_stage_config
from align.console import run_stage


@dataclass
class ArgillaStatusArgs:
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_stage_config("argilla_status", (ArgillaStatusArgs,), argv)
    rows = dataset_status(connect())
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no datasets"
    lines = []
    for row in rows:
        r = row["records"]
        lines.append(
            f"{row['workspace']}/{row['dataset']}: {r['total']} records, "
            f"{r['completed']} completed, {r['pending']} pending"
        )
        if not row["annotators"]:
            lines.append("    (no responses yet)")
        for user, c in sorted(row["annotators"].items()):
            lines.append(f"    {user:<20} submitted {c['submitted']:>5}  discarded {c['discarded']:>5}  draft {c['draft']:>5}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage(main, uses_torch=False, single_process="it reads Argilla once")
