"""Create annotator accounts on the Argilla server and add them to a workspace.

Consumes: --users alice,bob (comma-separated usernames), --workspace NAME; the
  server named by ARGILLA_API_URL/ARGILLA_API_KEY, else the local one from
  `make argilla` (.argilla/credentials.json).
Produces: annotator accounts in the workspace. Each new account's generated
  password is printed once, here, and stored nowhere; users that already exist
  are added to the workspace and keep their password.

    make annotators USERS=alice,bob [WORKSPACE=align]
"""

from __future__ import annotations

import argparse
import sys

from align.argilla_io import AlignError, connect, create_annotators


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create Argilla annotator accounts.")
    parser.add_argument("--users", required=True, help="comma-separated usernames, e.g. alice,bob")
    parser.add_argument("--workspace", default="align", help="workspace the annotators work in (where make candidates pushes)")
    args = parser.parse_args(argv)
    usernames = [u.strip() for u in args.users.split(",") if u.strip()]
    if not usernames:
        parser.error("--users: no usernames given")
    try:
        create_annotators(connect(), args.workspace, usernames)
    except AlignError as e:
        print(f"annotators: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
