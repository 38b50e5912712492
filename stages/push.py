"""Push a finished stage's model, with its model card, to the Hugging Face Hub.

Consumes
    - runs/<run>/<stage>/ (or `stage_dir`): a finished sft, reward, dpo, ppo or rloo output; its
      model/ folder is pushed exactly as the stage wrote it, model card (README.md) included
    - the hub: a token (HF_TOKEN, or `hf auth login`) and HF_HUB_OFFLINE unset or 0
      (the Makefile sets HF_HUB_OFFLINE=1 by default)

Produces the hub model repo `repo` (created when missing, private with `--private true`),
one commit holding model/. The stage folder is left as it is: its manifest is not touched,
so the hashes that child stages recorded stay valid. An output finished before stages wrote
cards gets its card written from its manifest first.

Run: make push RUN=default STAGE=dpo REPO=you/smollm2-kitchen-dpo [ARGS="--private true"]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align import hub, runs
from align.config import parse_stage_config
from align.console import run_stage, summary
from align.errors import ConfigError, LineageError
from align.model_card import CARD_FILE, CARD_KINDS, write_model_card

USAGE = "make push RUN=<run> STAGE=sft|reward|dpo|ppo|rloo REPO=<owner>/<name>"


@dataclass
class PushArgs:
    run: str = field(default="default", metadata={"help": "run name: pushes runs/<run>/<stage>/model"})
    stage: str | None = field(default=None, metadata={"help": "sft | reward | dpo | ppo | rloo"})
    repo: str | None = field(default=None, metadata={"help": "hub model repo id, <owner>/<name>"})
    stage_dir: str | None = field(default=None, metadata={"help": "an explicit stage folder instead of runs/<run>/<stage>"})
    private: bool = field(default=False, metadata={"help": "create the repo private (an existing repo keeps its visibility)"})
    commit_message: str | None = field(default=None, metadata={"help": "default: 'align <run>/<stage>'"})


def main(argv=None):
    (args,) = parse_stage_config("push", (PushArgs,), argv)
    checkpoint = find_stage(args)
    model_dir = checkpoint.folder / "model"
    repo = hub.check_repo(args.repo, USAGE)
    token = hub.hub_token("make push")  # refuses offline or without a token, before anything is written
    if not (model_dir / CARD_FILE).is_file():
        write_model_card(model_dir, checkpoint.manifest, checkpoint.folder)
        print(f"[push] {model_dir / CARD_FILE}: written from the manifest (this output predates model cards)")
    url = hub.upload_folder(model_dir, repo, token, args.private,
                 args.commit_message or f"align {checkpoint.manifest.get('run')}/{checkpoint.stage}")
    summary("push", model=str(model_dir), repo=url)


def find_stage(args: PushArgs) -> runs.Checkpoint:
    """The finished stage to push; its model/ must be a Hugging Face model folder."""
    if not args.stage and not args.stage_dir:
        raise ConfigError(f"stage: which stage's model to push (sft, reward, dpo, ppo or rloo); usage: {USAGE}")
    if args.stage and args.stage not in CARD_KINDS:
        raise ConfigError(f"stage: {args.stage!r} produces no model; expected one of {', '.join(CARD_KINDS)}")
    checkpoint = runs.find_checkpoint(args.run, [args.stage] if args.stage else [], args.stage_dir)
    if checkpoint.stage not in CARD_KINDS:
        raise LineageError(f"{checkpoint.folder}: a {checkpoint.stage} output holds no model to push; "
                           f"expected one of {', '.join(CARD_KINDS)}")
    if not (checkpoint.folder / "model" / "config.json").is_file():
        raise LineageError(f"{checkpoint.folder / 'model'}: no config.json, not a Hugging Face model folder; "
                           "rerun that stage")
    return checkpoint


if __name__ == "__main__":
    run_stage(main, uses_torch=False, single_process="it uploads to the Hub once")
