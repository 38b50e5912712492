"""`generation_backend: auto` with no measurement on record (align/backend_probe.py): the first
stage that samples probes vLLM against transformers once, records it, and decides by the rule;
the next run reads the record. Real engines, a real stage process, a cache folder of the test's own."""

from __future__ import annotations

import json

import pytest

from align import backend_probe, hardware
from tests.conftest import assert_ok, run_stage


def own_cache(tmp_path, default_model_dir, monkeypatch):
    """An empty ALIGN_CACHE holding only the converted default model (linked, not converted again)."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / default_model_dir.name).symlink_to(default_model_dir)
    monkeypatch.setenv("ALIGN_CACHE", str(cache))
    return cache


def test_the_first_auto_stage_probes_once_and_records_the_choice(runs_root, tiny_sft_run, tiny_data, tmp_path,
                                                                  default_model_dir, monkeypatch):
    own_cache(tmp_path, default_model_dir, monkeypatch)
    args = ["--sft_dir", str(runs_root / tiny_sft_run / "sft"), "--prompts_file", str(tiny_data["prompts"]),
            "--push", "false", "--suggest_with_reward", "false", "--max_new_tokens", "8", "--k", "2",
            "--max_prompts", "2", "--generation_backend", "auto"]
    first = run_stage("candidates", "--run", "probed", *args)
    assert_ok(first)
    assert "no backend measurement on record" in first.stderr and "probing vllm vs transformers once" in first.stderr
    record = hardware.recorded_backend_choice()
    assert record["source"] == "probe" and record["model"] == "default"
    dtype = "bfloat16" if hardware.native_bf16() else "float32"
    assert set(record["tokens_per_s"]) == {f"hf {dtype}", f"vllm {dtype}"}
    assert all(speed > 0 for speed in record["tokens_per_s"].values())
    assert record["backend"] == hardware.pick_backend(record["tokens_per_s"])[0]  # the one rule decides
    assert f"[generation] backend {record['backend']}" in first.stdout and "chosen by a short probe" in first.stdout

    second = run_stage("candidates", "--run", "probed-again", *args)
    assert_ok(second)
    assert "probing" not in second.stderr and "chosen by a short probe" in second.stdout
    manifest = json.loads((runs_root / "probed-again" / "candidates" / "manifest.json").read_text())
    assert manifest["generation"]["backend"].startswith(record["backend"])


@pytest.mark.slow  # a probe process
def test_a_probe_that_fails_records_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    assert backend_probe.run_probe(say=said.append, model=str(tmp_path / "no-such-model")) is None
    assert said[0].startswith("[generation] no backend measurement on record")
    assert said[-1].startswith("[generation] the backend probe failed (exit ") and said[-1].endswith("nothing recorded")
    assert hardware.recorded_backend_choice() is None
