"""The Hugging Face Hub, for what we upload: a stage's model (`make push`) and exported rankings
(`make export-rankings ARGS="--push_to_hub ..."`). Everything here turns the hub client's
failures into one line that says what to do.

The pipeline runs offline by default (HF_HUB_OFFLINE=1 in the Makefile); uploading is the one
thing that needs the network, so it is refused before anything is written unless the user turns
the hub on and has a token."""

from __future__ import annotations

from pathlib import Path

from align.errors import AlignError, ConfigError
from align.model_card import HUB_ID


def check_repo(repo: str | None, usage: str) -> str:
    if not repo:
        raise ConfigError(f"repo: the hub repo to push to, <owner>/<name>; usage: {usage}")
    if not HUB_ID.fullmatch(repo):
        raise ConfigError(f"repo: expected <owner>/<name> (letters, digits, '-', '_', '.'), got {repo!r}")
    return repo


def hub_token(command: str) -> str:
    """The token to push with; refuses when the hub is switched off or no token is set."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise AlignError("the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1, the Makefile's default): rerun "
                         f"with HF_HUB_OFFLINE=0 ({command} ... HF_HUB_OFFLINE=0) and a token in HF_TOKEN "
                         "or from `hf auth login`")
    token = get_token()
    if not token:
        raise AlignError("no Hugging Face token: set HF_TOKEN or run `.venv/bin/hf auth login` "
                         f"(`huggingface-cli login` with older huggingface_hub), then rerun {command}")
    return token


def upload_folder(folder: Path, repo: str, token: str, private: bool, message: str, repo_type: str = "model") -> str:
    """Create the repo if needed and upload the folder in one commit; hub failures become one line."""
    from huggingface_hub import HfApi, constants
    # errors.HTTPError is the hub client's own transport error base (httpx2 in huggingface_hub 2.x)
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, repo_type=repo_type, commit_message=message)
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
