"""The SFT stage end to end on a tiny model: a loadable checkpoint, a complete
manifest, and clean failures on bad input."""

import json

import pytest

from transformers import AutoModelForCausalLM, AutoTokenizer

from align.files import sha256_file
from tests.conftest import assert_ok, run_stage, write_jsonl


def test_sft_run_produces_loadable_checkpoint_and_manifest(runs_root, tiny_sft_run, tiny_data):
    folder = runs_root / tiny_sft_run / "sft"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "sft" and manifest["parent"] is None
    inputs = {entry["role"]: entry for entry in manifest["inputs"]}
    assert inputs["train"]["sha256"] == sha256_file(tiny_data["sft"]) and inputs["train"]["records"] == 16
    assert inputs["eval"]["sha256"] == sha256_file(tiny_data["prompts"])
    for key in ("seed", "versions", "git", "chat_template_sha256", "started_at", "finished_at", "config", "base_model"):
        assert manifest[key] is not None, key
    assert manifest["versions"]["trl"] and manifest["pad_token"] != manifest["eos_token"]
    metrics = manifest["metrics"]
    assert metrics["train_steps"] == 2 and metrics["eval_loss_before"] > 0 and metrics["eval_loss_after"] > 0
    # Cost accounting: the real tokens of 2 steps x 4 examples at 2F + 2B + 2T FLOPs each (LoRA in
    # every layer: the backward B runs through nearly all F), below the peak
    (train,) = metrics["cost"]["phases"].values()
    assert 8 * 10 < train["tokens"] < 8 * 512 and 0 < train["peak_fraction"] < 1
    upper = train["tokens"] * (4 * metrics["parameters"] + 2 * metrics["trainable_parameters"])
    assert 0.95 * upper < train["flops"] <= upper
    assert train["positions"] >= train["tokens"] and train["padding"] >= 0  # the batches' padded positions
    assert (folder / "config.yaml").is_file() and list((folder / "logs" / "tensorboard").iterdir())
    # The adapter is kept apart; the merged model loads on its own and generates.
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert not (folder / "model" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    assert tokenizer.pad_token != tokenizer.eos_token
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] == tokenizer.eos_token_id


def test_full_finetune_learns_on_tiny_model(runs_root, tiny_model_dir, tiny_data):
    """Held-out loss falls when the tiny model trains for real (full fine-tuning, no adapter)."""
    result = run_stage(
        "sft", "--run", "tiny-learn", "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(tiny_data["sft"]), "--eval_file", str(tiny_data["prompts"]),
        "--max_steps", "12", "--learning_rate", "0.003", "--per_device_train_batch_size", "8", "--use_peft", "false",
    )
    assert_ok(result)
    folder = runs_root / "tiny-learn" / "sft"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 1.0, metrics
    assert not (folder / "adapter").exists() and (folder / "model" / "model.safetensors").is_file()
    assert "[sft] eval loss" in result.stdout


def test_corrupt_data_fails_with_one_line_and_no_finished_folder(runs_root, tiny_model_dir, tmp_path, tiny_data):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"id": "1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    with open(bad, "a") as handle:
        handle.write('{"id": "2", "messages": [{"role": "user"}]}\n')
    result = run_stage("sft", "--run", "corrupt", "--model_name_or_path", str(tiny_model_dir),
                       "--train_file", str(bad), "--eval_file", str(tiny_data["prompts"]))
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: {bad}:2: messages[0].content: must be a non-empty string"], result.stderr
    assert not (runs_root / "corrupt" / "sft").exists()


def test_crash_mid_stage_leaves_only_a_failed_folder(runs_root, tiny_model_dir, tiny_data):
    result = run_stage("sft", "--run", "crash", "--model_name_or_path", str(tiny_model_dir),
                       "--train_file", str(tiny_data["sft"]), "--eval_file", str(tiny_data["prompts"]),
                       "--lora_target_modules", "no_such_module")
    assert result.returncode != 0
    run_folder = runs_root / "crash"
    assert not (run_folder / "sft").exists()
    (failed,) = run_folder.glob("sft.failed-*")
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"


def test_unknown_config_key_exits_2(tiny_model_dir):
    result = run_stage("sft", "--lerning_rate", "0.1")
    assert result.returncode == 2
    assert "unknown option(s) --lerning_rate; did you mean 'learning_rate'" in result.stderr


@pytest.mark.parametrize("strategy", ["group_by_length", "random"])
def test_the_default_config_batches_examples_of_similar_length(tiny_model_dir, tmp_path, strategy):
    """configs/sft.yaml's sampler (transformers' group_by_length: random mega-batches of 4 x 8
    rows, sorted by length inside) on 256 conversations of 10 to ~300 tokens: TRL's SFTTrainer
    batches hold far less padding than random batches, over every example of the epoch (1.09
    positions per real token against 1.68 when written). The example data's lengths (83-275
    tokens) give 1.41 in random batches of 8 and 1.08 grouped."""
    import random

    import yaml
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from align import data, training
    from align.models import load_causal_lm, load_tokenizer
    from align.runs import REPO_ROOT

    defaults = yaml.safe_load((REPO_ROOT / "configs" / "sft.yaml").read_text())
    if strategy == "group_by_length":
        assert defaults["train_sampling_strategy"] == strategy
    rng = random.Random(0)
    conversations = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": " ".join(["word"] * rng.randint(1, 300))}]} for i in range(256)]
    config = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=defaults["per_device_train_batch_size"],
                       train_sampling_strategy=strategy, max_length=defaults["max_length"], report_to="none",
                       use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=load_causal_lm(str(tiny_model_dir)),
                         args=training.fit_to_hardware(config, "fp32", tmp_path),
                         train_dataset=Dataset.from_list(data.completion_examples(conversations)),
                         processing_class=load_tokenizer(str(tiny_model_dir)))
    batches = list(trainer.get_train_dataloader())
    positions = sum(batch["input_ids"].numel() for batch in batches)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert tokens == sum(len(row["input_ids"]) for row in trainer.train_dataset)  # the whole epoch, once
    if strategy == "group_by_length":
        assert positions / tokens < 1.15
    else:
        assert positions / tokens > 1.3


def test_lora_in_the_top_layers_only_leaves_the_lower_ones_untouched(runs_root, tiny_model_dir, tiny_data):
    """`--lora_top_layers 1` on the tiny model's 2 layers: the adapter sits in the top layer only,
    the merged model's bottom layer is the base's bit for bit (tests/test_cost.py checks that
    the accounting then stops the backward at the top layer)."""
    import torch
    from safetensors.torch import load_file

    result = run_stage(
        "sft", "--run", "tiny-top", "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(tiny_data["sft"]), "--eval_file", str(tiny_data["prompts"]),
        "--max_steps", "3", "--learning_rate", "0.01", "--per_device_train_batch_size", "4",
        "--lora_top_layers", "1", "--lora_dropout", "0",
    )
    assert_ok(result)
    folder = runs_root / "tiny-top" / "sft"
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    base, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(folder / "model" / "model.safetensors")
    bottom = [name for name in base if ".layers.0." in name and name.endswith("q_proj.weight")]
    top = [name for name in base if ".layers.1." in name and name.endswith("q_proj.weight")]
    assert bottom and top
    assert all(torch.equal(base[name], merged[name]) for name in bottom)
    assert not all(torch.equal(base[name], merged[name]) for name in top)
