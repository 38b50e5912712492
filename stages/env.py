"""Print this machine's and install's facts for a bug report (like `trl env`).

Consumes: nothing but the machine, the venv and the align cache (nothing is measured,
downloaded or converted; the generation backend is what is on record).
Produces: plain text on stdout, one `- Name: value` line per fact (align/env_report.py).

    make env
    python -m stages.env
"""

from __future__ import annotations

from dataclasses import dataclass

from align.config import parse_stage_config
from align.console import run_stage
from align.env_report import environment_facts, format_report


@dataclass
class EnvArgs:
    """No options: the report is the same for everyone, so reports compare."""


def main(argv=None):
    parse_stage_config("env", (EnvArgs,), argv)  # refuses stray arguments with one line
    print(format_report(environment_facts()), flush=True)


if __name__ == "__main__":
    run_stage(main, uses_torch=False)  # the report itself says which allocator this process has
