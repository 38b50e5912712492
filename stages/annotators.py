"""Create annotator accounts on the Argilla server and add them to a workspace.

Consumes: --users alice,bob (comma-separated usernames), --workspace NAME; the
  server named by ARGILLA_API_URL/ARGILLA_API_KEY, else the local one from
  `make argilla` (.argilla/credentials.json).
Produces: annotator accounts in the workspace. Each new account's generated
  password is printed once, here, and stored nowhere; users that already exist
  are added to the workspace and keep their password.

    make annotators USERS=alice,bob [WORKSPACE=align]
    python -m stages.annotators --users alice,bob [--workspace align]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.argilla_io import connect, create_annotators
from align.config import parse_stage_config
from align.console import run_stage
from align.errors import ConfigError


@dataclass
class AnnotatorsArgs:
    users: str = field(metadata={"help": "comma-separated usernames, e.g. alice,bob"})
    workspace: str = field(default="align", metadata={
        "help": "workspace the annotators work in (where make candidates pushes)"})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_stage_config("annotators", (AnnotatorsArgs,), argv)
    usernames = [u.strip() for u in args.users.split(",") if u.strip()]
    if not usernames:
        raise ConfigError("--users: no usernames given")
    create_annotators(connect(), args.workspace, usernames)


if __name__ == "__main__":
    run_stage(main, uses_torch=False, single_process="it creates Argilla accounts once")
