"""The HH-RLHF recipe (configs/recipes/hh-rlhf/) end to end on a tiny model: gzipped HH text in,
SFT on the chosen answers, the reward model with the recipe's length settings, on-policy DPO and
make compare on the test pairs' prompts, each stage reading the recipe's file on top of its own
config, with the data paths from HH_TRAIN / HH_TEST, as `make ... RECIPE=hh-rlhf` runs them."""

from __future__ import annotations

import gzip
import json
import subprocess

import pytest

from tests.conftest import REPO, TOPICS, assert_ok, run_stage
from tests.fakes import read_rows

RECIPE = REPO / "configs" / "recipes" / "hh-rlhf"


def hh(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def write_gzipped_pairs(path, pairs) -> str:
    path.write_bytes(gzip.compress("".join(json.dumps(pair) + "\n" for pair in pairs).encode()))
    return str(path)


@pytest.fixture(scope="module")
def hh_files(tmp_path_factory, monkeypatch_module) -> dict:
    folder = tmp_path_factory.mktemp("hh")
    train = [{"chosen": hh(f"How do I cook {topic}?", f"Cook {topic} gently.\n\n1. Heat the pan.\n2. Add the {topic}."),
              "rejected": hh(f"How do I cook {topic}?", "Great question! Maybe somehow. Hope this helps!")}
             for topic in TOPICS]
    train.append({"chosen": hh("Hi", ""), "rejected": hh("Hi", "Hello.")})  # HH holds a few empty answers
    test = [{"chosen": hh(f"How long do {topic} keep?", f"{topic.capitalize()} keep a week."),
             "rejected": hh(f"How long do {topic} keep?", "Forever!")} for topic in TOPICS[:4]]
    test.append(dict(test[0], rejected=hh("How long do rice keep?", "No idea.")))  # a prompt seen twice
    test.append({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi"})  # malformed
    files = {"train": write_gzipped_pairs(folder / "train.jsonl.gz", train),
             "test": write_gzipped_pairs(folder / "test.jsonl.gz", test)}
    monkeypatch_module.setenv("HH_TRAIN", files["train"])
    monkeypatch_module.setenv("HH_TEST", files["test"])
    return files


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def recipe_stage(stage: str, run: str, *overrides: str) -> subprocess.CompletedProcess:
    """`make <stage> RECIPE=hh-rlhf RUN=<run> ARGS="<overrides>"` without make's install step."""
    return run_stage(stage, "--run", run, "--config", str(RECIPE / f"{stage}.yaml"), *overrides)


def manifest(runs_root, run: str, stage: str) -> dict:
    return json.loads((runs_root / run / stage / "manifest.json").read_text())


@pytest.mark.slow
def test_the_hh_recipe_runs_sft_reward_dpo_and_compare_on_hh_files(runs_root, tiny_model_dir, hh_files):
    run = "hh-recipe"
    sampling = ("--generation_backend", "hf", "--score_batch_size", "8")
    assert_ok(recipe_stage("sft", run, "--model_name_or_path", str(tiny_model_dir), "--max_steps", "2",
                           "--per_device_train_batch_size", "4", "--logging_steps", "1"))
    assert_ok(recipe_stage("reward", run, "--max_steps", "2", "--per_device_train_batch_size", "4",
                           "--logging_steps", "1", "--heldout_fraction", "0.25"))
    dpo_overrides = ("--rounds", "1", "--prompts_per_round", "8", "--samples_per_prompt", "2", "--max_new_tokens", "8",
                     "--eval_max_new_tokens", "8", "--min_reward_margin", "0", "--truncated_answers", "keep",
                     "--kl_max_samples", "8", "--warmup_steps", "0", "--learning_rate", "0.003", *sampling)
    assert_ok(recipe_stage("dpo", run, *dpo_overrides))
    compare_overrides = ("--max_new_tokens", "8", "--bootstrap_resamples", "200", *sampling)
    compare = recipe_stage("compare", run, *compare_overrides)
    assert_ok(compare)

    # Every stage read the recipe on top of its own config, with the paths from the environment.
    sft, reward, dpo = (manifest(runs_root, run, stage) for stage in ("sft", "reward", "dpo"))
    assert sft["config"]["train_file"] == hh_files["train"] and sft["config"]["eval_file"] == hh_files["test"]
    assert sft["config"]["num_train_epochs"] == 1
    assert reward["config"]["ranked_files"] == [hh_files["train"]]
    assert reward["config"]["length_decorrelation"] == 1.0
    assert reward["config"]["num_train_epochs"] == 2
    assert reward["config"]["train_sampling_strategy"] == "group_by_length"
    assert dpo["config"]["eval_file"] == hh_files["test"] and dpo["config"]["eval_limit"] == 64
    # Lineage through the manifests, and the data each stage read, by hash.
    assert reward["parent"]["stage"] == "sft" and dpo["parent"]["stage"] == "sft"
    assert hh_files["train"] in json.dumps(sft["inputs"]) and hh_files["test"] in json.dumps(sft["inputs"])
    # SFT trained on the 16 chosen answers (the pair with an empty answer skipped); the reward model
    # on the 16 pairs, the broken one counted as a bad ranking.
    assert reward["metrics"]["bad_rankings"] == 1
    assert reward["metrics"]["train_pairs"] + reward["metrics"]["heldout_pairs"] == 16
    # Held-out prompts: the test file's 4 distinct prompts (the repeat read once, the broken one skipped).
    heldout_ids = {row["prompt_id"] for row in read_rows(runs_root / run / "dpo" / "samples" / "eval_sft.jsonl")}
    assert heldout_ids == {"test-1", "test-2", "test-3", "test-4"}
    verdicts = [line for line in compare.stdout.splitlines() if line.startswith("[compare] dpo vs sft:")]
    assert len(verdicts) == 1 and "win rate" in verdicts[0], compare.stdout[-2000:]
    assert "malformed pair skipped" in compare.stderr and "test.jsonl.gz:6" in compare.stderr
    samples = read_rows(runs_root / run / "compare" / "samples.jsonl")
    assert {(row["prompt_id"], row["model"]) for row in samples} == {
        (prompt_id, model) for prompt_id in heldout_ids for model in ("sft", "dpo")}
    metrics = manifest(runs_root, run, "compare")["metrics"]
    assert metrics["dpo_kl"] > 0  # DPO moved the policy; compare measured it on the HH test prompts

    # A rerun of an up-to-date stage says so in one line, not the malformed-pair warning again.
    for stage, overrides in (("dpo", dpo_overrides), ("compare", compare_overrides)):
        again = recipe_stage(stage, run, *overrides)
        assert_ok(again)
        assert f"[{stage}] up to date" in again.stdout and "malformed pair" not in again.stderr + again.stdout


def make_dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_make_puts_the_recipe_under_the_users_config_and_names_the_run_after_it():
    (command,) = [line for line in make_dry_run("sft", "RECIPE=hh-rlhf", "ARGS=--config mine.yaml").stdout.splitlines()
                  if "-m stages.sft" in line]
    assert command.split("-m stages.sft", 1)[1].split() == [
        "--run", "hh-rlhf", "--config", "configs/recipes/hh-rlhf/sft.yaml", "--config", "mine.yaml"]
    assert "--run mine --config configs/recipes/hh-rlhf/ppo.yaml" in make_dry_run("ppo", "RECIPE=hh-rlhf", "RUN=mine").stdout
    # a stage the recipe does not name runs on its own config; no recipe, no --config
    assert "--config" not in make_dry_run("candidates", "RECIPE=hh-rlhf").stdout
    assert "-m stages.dpo --run default" in make_dry_run("dpo").stdout and "--config" not in make_dry_run("dpo").stdout
    missing = make_dry_run("sft", "RECIPE=hh")
    assert missing.returncode != 0 and "RECIPE=hh: no recipe in configs/recipes/hh/; recipes: hh-rlhf" in missing.stderr
