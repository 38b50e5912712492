"""Push a finished stage's model, with its model card, to the Hugging Face Hub.

Consumes
    - runs/<run>/<stage>/ (or `stage_dir`): a finished sft, reward, dpo or ppo output; its
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
from pathlib import Path

from align import runs
from align.config import parse_stage_config
from align.console import run_stage, summary
from align.errors import AlignError, ConfigError, LineageError
from align.model_card import CARD_FILE, CARD_KINDS, HUB_ID, write_model_card

USAGE = "make push RUN=<run> STAGE=sft|reward|dpo|ppo REPO=<owner>/<name>"


@dataclass
class PushArgs:
    run: str = field(default="default", metadata={"help": "run name: pushes runs/<run>/<stage>/model"})
    stage: str | None = field(default=None, metadata={"help": "sft | reward | dpo | ppo"})
    repo: str | None = field(default=None, metadata={"help": "hub model repo id, <owner>/<name>"})
    stage_dir: str | None = field(default=None, metadata={"help": "an explicit stage folder instead of runs/<run>/<stage>"})
    private: bool = field(default=False, metadata={"help": "create the repo private (an existing repo keeps its visibility)"})
    commit_message: str | None = field(default=None, metadata={"help": "default: 'align <run>/<stage>'"})


def main(argv=None):
    (args,) = parse_stage_config("push", (PushArgs,), argv)
    checkpoint = find_stage(args)
    model_dir = checkpoint.folder / "model"
    repo = check_repo(args.repo)
    token = hub_token()  # refuses offline or without a token, before anything is written
    if not (model_dir / CARD_FILE).is_file():
        write_model_card(model_dir, checkpoint.manifest, checkpoint.folder)
        print(f"[push] {model_dir / CARD_FILE}: written from the manifest (this output predates model cards)")
    url = upload(model_dir, repo, token, args.private,
                 args.commit_message or f"align {checkpoint.manifest.get('run')}/{checkpoint.stage}")
    summary("push", model=str(model_dir), repo=url)


def find_stage(args: PushArgs) -> runs.Checkpoint:
    """The finished stage to push; its model/ must be a Hugging Face model folder."""
    if not args.stage and not args.stage_dir:
        raise ConfigError(f"stage: which stage's model to push (sft, reward, dpo or ppo); usage: {USAGE}")
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


def check_repo(repo: str | None) -> str:
    if not repo:
        raise ConfigError(f"repo: the hub repo to push to, <owner>/<name>; usage: {USAGE}")
    if not HUB_ID.fullmatch(repo):
        raise ConfigError(f"repo: expected <owner>/<name> (letters, digits, '-', '_', '.'), got {repo!r}")
    return repo


def hub_token() -> str:
    """The token to push with; refuses when the hub is switched off or no token is set."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise AlignError("the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1, the Makefile's default): rerun "
                         "with HF_HUB_OFFLINE=0 (make push ... HF_HUB_OFFLINE=0) and a token in HF_TOKEN "
                         "or from `hf auth login`")
    token = get_token()
    if not token:
        raise AlignError("no Hugging Face token: set HF_TOKEN or run `.venv/bin/hf auth login` "
                         "(`huggingface-cli login` with older huggingface_hub), then rerun make push")
    return token


def upload(model_dir: Path, repo: str, token: str, private: bool, message: str) -> str:
    """Create the repo if needed and upload the folder in one commit; hub failures become one line."""
    from huggingface_hub import HfApi, constants
    # errors.HTTPError is the hub client's own transport error base (httpx2 in huggingface_hub 2.x)
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo, folder_path=model_dir, repo_type="model", commit_message=message)
    except OfflineModeIsEnabled:
        raise AlignError("the Hugging Face Hub is switched off (HF_HUB_OFFLINE): rerun with HF_HUB_OFFLINE=0") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        hint = ("the token is invalid or may not write to it: check HF_TOKEN / `hf auth login`"
                if status in (401, 403) else "see the hub's message")
        raise AlignError(f"hub refused the push to {repo} (HTTP {status}): {one_line(error)}; {hint}") from None
    except HTTPError as error:  # after HfHubHTTPError: what is left is connecting, DNS, TLS, timeouts
        raise AlignError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: "
                         f"{one_line(error)}); check the network or HF_ENDPOINT and rerun") from None
    return commit.commit_url


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    run_stage(main, uses_torch=False, single_process="it uploads to the Hub once")
