"""Show annotation progress on the Argilla server, per dataset.

Consumes: the server named by ARGILLA_API_URL/ARGILLA_API_KEY, else the local
  one from `make argilla` (.argilla/credentials.json).
Produces: a table on stdout (or JSON with --json): per dataset its records
  (total, completed = reached the dataset's min_submitted, pending) and per
  annotator the responses submitted, discarded and left as draft.

    make argilla-status
"""

from __future__ import annotations

import argparse
import json
import sys

from align.argilla_io import AlignError, connect, dataset_status


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Annotation progress per Argilla dataset.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = dataset_status(connect())
    except AlignError as e:
        print(f"argilla-status: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))


if __name__ == "__main__":
    main()
