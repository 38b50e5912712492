"""The bad-input corpus (issue 12): every data format and config a stage reads, broken the ways users
break them, fed to the real stage as a subprocess.

Each case must end the way `align/errors.py` promises: exit 2, a last stderr line `error: ...` naming
file:line: field (or the config key, or the folder) and what to do, no traceback anywhere, and the runs
root byte for byte as it was (no `<stage>/`, no `<stage>.failed-*`, no `.tmp-` left behind).

`CASES` is the one table. A case's `file` is a file in tests/bad_inputs/ or a name that `build` makes
at test time: bytes that git or an editor would mangle (a non-UTF-8 byte, an empty file, a 1 MiB
line), model folders and stage outputs (a tokenizer-less model, a reward model
with two labels, a parent run that failed). Cases that need a model are slow, and so are three that
repeat a fast case's check through a stage that imports TRL; the rest validate before any model loads
and run in the fast tier (about two minutes: every case is a fresh Python process).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.files import sha256_file
from tests.conftest import REPO, run_stage

CORPUS = Path(__file__).resolve().parent / "bad_inputs"


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    args: tuple[str, ...]  # "{file}": the bad file; "{run}": this case's own run name
    file: str  # a file in tests/bad_inputs/, or a name `build` makes at test time
    expect: tuple[str, ...]  # fragments of the error line, "{file}" as in args
    slow: bool = False  # needs a model, or repeats a fast case's check through a TRL stage (~9 s)


def case(name, stage, args, file, *expect, slow=False) -> Case:
    return Case(name, stage, tuple(args.split()), file, expect, slow)


# Cheap stages carry the format checks every stage shares (compare, candidates: no torch before
# validation; ppo: a few seconds); sft, reward and dpo import TRL first (~8 s each), so they get the
# checks only they make.
CASES = [
    # conversations: data/sft.jsonl (sft --train_file)
    case("sft-messages-wrong-type", "sft", "--run {run} --train_file {file}", "sft_wrong_type.jsonl",
         "{file}:2: messages: must be a non-empty list", slow=True),
    case("sft-message-missing-content", "sft", "--run {run} --train_file {file}", "sft_missing_content.jsonl",
         "{file}:1: messages[1].content: must be a non-empty string"),
    case("sft-unknown-field", "sft", "--run {run} --train_file {file}", "sft_unknown_field.jsonl",
         "{file}:1: mesages: unknown field", "'messages'"),
    case("sft-no-user-turn", "sft", "--run {run} --train_file {file}", "sft_no_user_turn.jsonl",
         "{file}:2: messages[1].role: expected 'user'"),
    case("sft-empty-train-file", "sft", "--run {run} --train_file {file}", "empty.jsonl",
         "{file}: file is empty", slow=True),
    # prompts: data/eval_prompts.jsonl (sft --eval_file, compare, dpo/ppo --eval_file), data/candidate_prompts.jsonl
    case("sft-eval-without-references", "sft", "--run {run} --eval_file {file}", "eval_no_reference.jsonl",
         "{file}: reference:"),
    case("prompts-broken-json", "compare", "--run {run} --prompts_file {file}", "prompts_broken_json.jsonl",
         "{file}:2: not valid JSON"),
    case("prompts-id-wrong-type", "compare", "--run {run} --prompts_file {file}", "prompts_wrong_type.jsonl",
         "{file}:1: prompt_id: must be a non-empty string id"),
    case("prompts-missing-prompt", "candidates", "--run {run} --prompts_file {file}", "prompts_missing_prompt.jsonl",
         "{file}:2: prompt: must be a non-empty list"),
    case("prompts-unknown-field", "compare", "--run {run} --prompts_file {file}", "prompts_unknown_field.jsonl",
         "{file}:1: refrence: unknown field", "'reference'"),
    case("prompts-no-user-turn", "candidates", "--run {run} --prompts_file {file}", "prompts_no_user_turn.jsonl",
         "{file}:1: prompt: the last message must be from the user"),
    case("prompts-duplicate-id", "candidates", "--run {run} --prompts_file {file}", "prompts_duplicate_id.jsonl",
         "{file}:2: prompt_id: duplicate 'p-1'"),
    case("prompts-reference-wrong-type", "compare", "--run {run} --prompts_file {file}",
         "prompts_reference_wrong_type.jsonl", "{file}:1: reference: must be a non-empty string"),
    case("prompts-empty-file", "candidates", "--run {run} --prompts_file {file}", "empty.jsonl",
         "{file}: file is empty"),
    case("prompts-non-utf8-byte", "candidates", "--run {run} --prompts_file {file}", "non_utf8.jsonl",
         "{file}:2: not valid UTF-8"),
    case("prompts-1mb-line", "compare", "--run {run} --prompts_file {file}", "long_line.jsonl",
         "{file}:2: line is"),
    case("ppo-eval-missing-prompt", "ppo", "--run {run} --eval_file {file}", "prompts_missing_prompt.jsonl",
         "{file}:2: prompt: must be a non-empty list"),
    # ranked responses: data/ranked.jsonl (reward, dpo, ppo --ranked_files)
    case("ranked-broken-json", "ppo", "--run {run} --ranked_files {file}", "ranked_broken_json.jsonl",
         "{file}:2: not valid JSON"),
    case("ranked-rank-wrong-type", "ppo", "--run {run} --ranked_files {file}", "ranked_wrong_type.jsonl",
         "{file}:1: responses[1].rank: must be an integer >= 1"),
    case("ranked-missing-responses", "ppo", "--run {run} --ranked_files {file}", "ranked_missing_responses.jsonl",
         "{file}:2: responses: missing"),
    case("ranked-unknown-field", "ppo", "--run {run} --ranked_files {file}", "ranked_unknown_field.jsonl",
         "{file}:1: annotater: unknown field", "'annotator'"),
    case("ranked-no-user-turn", "ppo", "--run {run} --ranked_files {file}", "ranked_no_user_turn.jsonl",
         "{file}:1: prompt: the last message must be from the user"),
    case("rloo-ranked-broken-json", "rloo", "--run {run} --ranked_files {file}", "ranked_broken_json.jsonl",
         "{file}:2: not valid JSON"),
    case("ranked-non-utf8-byte", "ppo", "--run {run} --ranked_files {file}", "non_utf8.jsonl",
         "{file}:2: not valid UTF-8"),
    case("reward-all-ranks-tied", "reward", "--run {run} --ranked_files {file}", "ranked_all_tied.jsonl",
         "{file}:1: responses: all 3 ranks are equal"),
    case("reward-rank-out-of-range", "reward", "--run {run} --bad_rankings refuse --ranked_files {file}",
         "ranked_rank_out_of_range.jsonl", "{file}:2: responses[1].rank: rank 5 is out of range"),
    case("reward-duplicate-responses", "reward", "--run {run} --bad_rankings refuse --ranked_files {file}",
         "ranked_duplicate_responses.jsonl", "{file}:2: responses[1].text: same text"),
    case("dpo-offline-all-ranks-tied", "dpo", "--run {run} --mode offline --ranked_files {file}",
         "ranked_all_tied.jsonl", "{file}:1: responses: all 3 ranks are equal"),
    # configs passed with --config
    case("config-broken-yaml", "candidates", "--run {run} --config {file}", "config_broken_yaml.yaml",
         "{file}:3: not valid YAML"),
    case("config-wrong-type", "candidates", "--run {run} --config {file}", "config_wrong_type.yaml",
         "{file}: max_prompts: expected int"),
    case("config-unknown-key", "compare", "--run {run} --config {file}", "config_unknown_key.yaml",
         "{file}: unknown key 'temprature'", "'temperature'"),
    case("config-not-a-mapping", "candidates", "--run {run} --config {file}", "config_not_mapping.yaml",
         "{file}: must be a mapping"),
    case("config-bad-choice", "compare", "--run {run} --config {file}", "config_bad_choice.yaml",
         "{file}: generation_backend: expected one of"),
    case("config-renamed-key", "candidates", "--run {run} --config {file}", "config_renamed_key.yaml",
         "{file}: 'backend' is now called 'generation_backend'"),
    case("config-value-out-of-range", "candidates", "--run {run} --config {file}", "config_too_few_candidates.yaml",
         "k: a ranking needs at least 2 candidates"),
    case("config-ppo-critic-warmup-every-update", "ppo", "--run {run} --config {file}",
         "config_ppo_warmup_every_update.yaml", "critic_warmup_updates: must be >= 0 and below updates (4)"),
    case("config-confidence-out-of-range", "compare", "--run {run} --config {file}", "config_bad_confidence.yaml",
         "confidence: must be between 0 and 1"),
    case("config-empty-file", "compare", "--run {run} --config {file}", "empty.yaml",
         "{file}: config file is empty"),
    case("config-non-utf8-byte", "candidates", "--run {run} --config {file}", "non_utf8.yaml",
         "{file}:2: not valid UTF-8"),
    case("config-file-not-found", "compare", "--run {run} --config {file}", "missing.yaml",
         "{file}: config file not found"),
    case("config-cli-wrong-type", "candidates", "--run {run} --max_prompts ten", "none",
         "command line:", "--max_prompts", "ten"),
    # a hub dataset id while offline (HF_HUB_OFFLINE=1, the default): one line before any network call
    case("ranked-hub-id-offline", "ppo", "--run {run} --ranked_files hf:Anthropic/hh-rlhf:test", "none",
         "hf:Anthropic/hh-rlhf:test: a hub dataset, but HF_HUB_OFFLINE=1", "set HF_HUB_OFFLINE=0"),
    # trackers (report_to, align/trackers.py): checked before any model loads
    case("config-unknown-tracker", "ppo", "--run {run} --report_to tensorboard wandbb", "none",
         "report_to: unknown tracker 'wandbb'", "did you mean 'wandb'"),
    case("sft-unsupported-tracker", "sft", "--run {run} --report_to mlflow", "none",
         "report_to: unknown tracker 'mlflow'", "tensorboard, wandb or none", slow=True),
    # parents: runs/<run>/<stage>/manifest.json
    case("parent-failed", "compare", "--run {run}", "failed_sft_parent",
         "{file}: status is 'failed', not 'complete'"),
    case("dpo-parent-failed", "dpo", "--run {run}", "failed_sft_parent",
         "{file}: status is 'failed', not 'complete'", slow=True),
    case("parent-missing", "candidates", "--run {run} --push false", "none",
         "no finished runs/", "/sft", "make sft"),
    case("parent-manifest-broken-json", "compare", "--run {run}", "broken_sft_manifest",
         "{file}:3: not valid JSON"),
    # models
    case("model-without-tokenizer", "sft", "--run {run} --model_name_or_path {file}", "model_without_tokenizer",
         "{file}: no tokenizer", slow=True),
    case("model-without-chat-template", "sft", "--run {run} --model_name_or_path {file}",
         "model_without_chat_template", "{file}: tokenizer has no chat template", slow=True),
    case("reward-model-two-labels", "compare", "--run {run} --generation_backend hf --max_new_tokens 4",
         "reward_with_two_labels", "{file}: num_labels is 2", slow=True),
    case("candidates-reward-model-two-labels", "candidates",
         "--run {run} --push false --generation_backend hf --max_prompts 2 --k 2 --max_new_tokens 4",
         "reward_with_two_labels", "{file}: num_labels is 2", slow=True),
]


# ---- files made at test time --------------------------------------------------------------------

GOOD_PROMPT_LINE = json.dumps({"prompt_id": "p-1", "prompt": [{"role": "user", "content": "How long do eggs keep?"}]})


def empty_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"")
    return path


def non_utf8_jsonl(folder: Path) -> Path:
    """Line 2 says "Café" in Latin-1 (0xe9), as a spreadsheet export on Windows writes it."""
    path = folder / "non_utf8.jsonl"
    record = '{"prompt_id": "p-2", "prompt": [{"role": "user", "content": "Caf\xe9 au lait?"}]}'
    path.write_bytes(GOOD_PROMPT_LINE.encode() + b"\n" + record.encode("latin-1") + b"\n")
    return path


def non_utf8_yaml(folder: Path) -> Path:
    path = folder / "non_utf8.yaml"
    path.write_bytes(b"k: 4\ntemperature: 0.7  # caf\xe9\n")
    return path


def long_line_jsonl(folder: Path) -> Path:
    """Line 2 is one valid record of just over 1 MiB (the limit of a JSON Lines line)."""
    path = folder / "long_line.jsonl"
    record = {"prompt_id": "p-2", "prompt": [{"role": "user", "content": "eggs " * (1 << 18)}]}
    path.write_text(GOOD_PROMPT_LINE + "\n" + json.dumps(record) + "\n")
    return path


def sft_parent_manifest(runs_root: Path, run: str, text: str) -> Path:
    """runs/<run>/sft/ holding only the given manifest text: the parent as the child finds it."""
    manifest = runs_root / run / "sft" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(text)
    return manifest


def failed_sft_parent(runs_root: Path, run: str) -> Path:
    failed = {"stage": "sft", "run": run, "status": "failed", "error": "RuntimeError: killed by the test"}
    return sft_parent_manifest(runs_root, run, json.dumps(failed, indent=2))


def broken_sft_manifest(runs_root: Path, run: str) -> Path:
    return sft_parent_manifest(runs_root, run, '{\n  "stage": "sft",\n  "status": "complete",,\n}\n')


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "added_tokens.json")


def model_without_tokenizer(folder: Path, tiny_model_dir: Path) -> Path:
    target = folder / "no-tokenizer"
    shutil.copytree(tiny_model_dir, target)
    for name in TOKENIZER_FILES:
        (target / name).unlink(missing_ok=True)
    return target


def model_without_chat_template(folder: Path, tiny_model_dir: Path) -> Path:
    target = folder / "no-chat-template"
    shutil.copytree(tiny_model_dir, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2))
    return target


def reward_with_two_labels(run: str, tiny_model_dir: Path) -> Path:
    """Finished sft and dpo stages of `run`, and a reward stage whose model has num_labels 2."""
    from tests import fakes

    fakes.make_policy_stage(run, "sft", tiny_model_dir)
    fakes.make_policy_stage(run, "dpo", tiny_model_dir, noise=0.02, seed=1)
    return fakes.make_reward_stage(run, tiny_model_dir, num_labels=2) / "model"


def build(name: str, tmp_path: Path, run: str, request) -> Path:
    """The path a case's `file` names: made here when it is generated, else the corpus file."""
    runs_root = request.getfixturevalue("runs_root")
    builders = {
        "empty.jsonl": lambda: empty_file(tmp_path, "empty.jsonl"),
        "empty.yaml": lambda: empty_file(tmp_path, "empty.yaml"),
        "non_utf8.jsonl": lambda: non_utf8_jsonl(tmp_path),
        "non_utf8.yaml": lambda: non_utf8_yaml(tmp_path),
        "long_line.jsonl": lambda: long_line_jsonl(tmp_path),
        "missing.yaml": lambda: tmp_path / "missing.yaml",
        "none": lambda: tmp_path / "unused",  # the bad input is on the command line, or absent from runs/
        "failed_sft_parent": lambda: failed_sft_parent(runs_root, run),
        "broken_sft_manifest": lambda: broken_sft_manifest(runs_root, run),
        "model_without_tokenizer": lambda: model_without_tokenizer(tmp_path, request.getfixturevalue("tiny_model_dir")),
        "model_without_chat_template": lambda: model_without_chat_template(
            tmp_path, request.getfixturevalue("tiny_model_dir")),
        "reward_with_two_labels": lambda: reward_with_two_labels(run, request.getfixturevalue("tiny_model_dir")),
    }
    if name in builders:
        return builders[name]()
    path = CORPUS / name
    assert path.is_file(), f"{name}: neither a file in {CORPUS} nor a builder"
    return path


def tree_state(root: Path) -> dict[str, str]:
    """Every path under `root` with its sha256 (folders as "dir"): what "runs/ unchanged" compares."""
    return {path.relative_to(root).as_posix(): sha256_file(path) if path.is_file() else "dir"
            for path in sorted(root.rglob("*"))}


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                 for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_runs_alone(bad: Case, runs_root, tmp_path, request):
    run = f"bad-{bad.name}"
    path = build(bad.file, tmp_path, run, request)
    before = tree_state(runs_root)  # after the case's own parents exist: only the stage must not touch them

    result = run_stage(bad.stage, *(arg.format(file=path, run=run) for arg in bad.args), timeout=600)

    output = result.stdout + result.stderr
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert "Traceback" not in output, shown
    assert result.returncode == 2, shown
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), shown
    assert sum(line.startswith("error: ") for line in lines) == 1, shown
    for fragment in bad.expect:
        assert fragment.format(file=path) in lines[-1], f"{fragment.format(file=path)!r} not in:\n{lines[-1]}"
    assert tree_state(runs_root) == before, f"runs/ changed\n{shown}"


def test_corpus_files_are_all_used():
    """Every file in tests/bad_inputs/ is some case's input: no orphan that nobody checks."""
    used = {c.file for c in CASES}
    assert sorted(path.name for path in CORPUS.iterdir()) == sorted(name for name in used if (CORPUS / name).exists())


def test_readme_counts_the_cases():
    stated = re.search(r"a corpus of (\d+) broken\s+inputs", (REPO / "README.md").read_text())
    assert stated and int(stated.group(1)) == len(CASES)
