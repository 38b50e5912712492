"""The candidates stage on the tiny SFT run: offline (--push false), with reward-model
suggestions, with bad input, and pushed to a real local Argilla server."""

from __future__ import annotations

import json

import pytest

from align import files
from tests.argilla_fixtures import assert_no_secrets
from tests.conftest import assert_ok, run_stage

pytestmark = pytest.mark.slow

FAST = ("--max_new_tokens", "12", "--k", "3", "--max_prompts", "5", "--kv_cache_gib", "0.25")
OFFLINE = ("--push", "false", "--suggest_with_reward", "false", *FAST)


def read_output(runs_root, run: str) -> tuple[dict, list[dict]]:
    folder = runs_root / run / "candidates"
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, files.read_jsonl_records(folder / "candidates.jsonl")


def test_offline_candidates_file_and_manifest(runs_root, tiny_sft_run, tiny_data):
    sft = runs_root / tiny_sft_run / "sft"
    args = ("--run", "cand-offline", "--sft_dir", str(sft), "--prompts_file", str(tiny_data["prompts"]), *OFFLINE)
    result = run_stage("candidates", *args)
    assert_ok(result)
    assert "[candidates] prompts 5 | k 3" in result.stdout and "not pushed" in result.stdout
    assert "[generation] backend" in result.stdout  # says which backend it picked and why

    manifest, records = read_output(runs_root, "cand-offline")
    assert manifest["status"] == "complete" and manifest["stage"] == "candidates"
    assert manifest["parent"]["stage"] == "sft" and manifest["parent"]["path"] == str(sft)
    assert manifest["argilla"] == {"dataset": "cand-offline-candidates", "workspace": "align", "pushed": False,
                                   "records": 0}
    assert manifest["sampling"] == {"n": 3, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 12, "seed": 42}
    assert manifest["inputs"][0]["path"] == str(tiny_data["prompts"]) and manifest["inputs"][0]["records"] == 5
    metrics = manifest["metrics"]
    assert metrics["prompts"] == 5 and metrics["candidates"] == 15 and metrics["sampling_s"] > 0
    assert metrics["tokens"] == sum(c["tokens"] for r in records for c in r["candidates"]) and metrics["tokens"] > 0
    # compute (align/cost.py): the sampling's model FLOPs, below this machine's matmul peak; no scoring here
    phases = metrics["cost"]["phases"]
    assert list(phases) == ["generate"] and phases["generate"]["flops"] > 0, phases
    assert 0 < phases["generate"]["peak_fraction"] < 1 and "compute generate" in result.stdout

    expected = files.read_jsonl_records(tiny_data["prompts"])[:5]
    assert [r["prompt_id"] for r in records] == [e["prompt_id"] for e in expected]
    assert [r["prompt"] for r in records] == [e["prompt"] for e in expected]
    for record in records:
        assert len(record["candidates"]) == 3 and record["suggested_ranking"] is None
        for candidate in record["candidates"]:
            assert candidate["finish_reason"] in ("stop", "length") and 1 <= candidate["tokens"] <= 12
            assert candidate["logprob"] < 0 and isinstance(candidate["text"], str)
        assert len({c["text"] for c in record["candidates"]}) > 1  # sampled, not greedy copies

    # Seeded: a rerun samples the same candidates (and replaces the output atomically).
    assert_ok(run_stage("candidates", *args))
    assert read_output(runs_root, "cand-offline")[1] == records


def test_bad_input_fails_cleanly(runs_root, tiny_sft_run, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt_id": "p1", "prompt": [{"role": "user", "content": "Hi"}]}\n{"prompt_id": "p2"}\n')
    sft = str(runs_root / tiny_sft_run / "sft")
    result = run_stage("candidates", "--run", "cand-bad", "--sft_dir", sft, "--prompts_file", str(bad), *OFFLINE)
    assert result.returncode == 2 and f"{bad}:2: prompt" in result.stderr
    result = run_stage("candidates", "--run", "cand-bad", "--sft_dir", sft, "--k", "1", "--push", "false")
    assert result.returncode == 2 and "k: a ranking needs at least 2" in result.stderr
    result = run_stage("candidates", "--run", "no-such-run", "--push", "false")
    assert result.returncode == 2 and "runs/no-such-run/sft" in result.stderr
    assert not (runs_root / "cand-bad" / "candidates").exists()


def test_reward_model_ranking_becomes_the_suggestion(runs_root, tiny_sft_run, tiny_data):
    run, sft = "cand-reward", str(runs_root / tiny_sft_run / "sft")
    assert_ok(run_stage("reward", "--run", run, "--sft_dir", sft, "--ranked_files", str(tiny_data["ranked"]),
                        "--max_steps", "2", "--per_device_train_batch_size", "4", "--precision", "fp32"))
    result = run_stage("candidates", "--run", run, "--sft_dir", sft, "--prompts_file", str(tiny_data["prompts"]),
                       "--push", "false", *FAST)
    assert_ok(result)
    manifest, records = read_output(runs_root, run)
    assert manifest["reward_model"]["stage"] == "reward" and manifest["metrics"]["suggested"] is True
    phases = manifest["metrics"]["cost"]["phases"]
    assert list(phases) == ["generate", "score", "total"] and phases["score"]["tokens"] > 0, phases

    from align.scoring import load_reward_checkpoint

    scorer = load_reward_checkpoint(run)
    for record in records:
        rewards = [c["reward"] for c in record["candidates"]]
        rescored = scorer.score([record["prompt"]] * 3, [c["text"] for c in record["candidates"]])
        assert rewards == pytest.approx(rescored, abs=1e-4)
        best = max(range(3), key=lambda i: rewards[i])
        assert record["suggested_ranking"][best] == 1 and sorted(record["suggested_ranking"])[-1] <= 3


def test_push_to_argilla(runs_root, tiny_sft_run, tiny_data, argilla_server, unique_name, monkeypatch):
    dataset, workspace = unique_name("cand"), unique_name("ws")
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    result = run_stage("candidates", "--run", "cand-push", "--sft_dir", str(runs_root / tiny_sft_run / "sft"),
                       "--prompts_file", str(tiny_data["prompts"]), "--argilla_dataset", dataset,
                       "--argilla_workspace", workspace, "--suggest_with_reward", "false", *FAST)
    assert_ok(result)
    assert f"pushed 5 records to Argilla dataset {workspace}/{dataset}" in result.stdout
    manifest, records = read_output(runs_root, "cand-push")
    assert manifest["argilla"] == {"dataset": dataset, "workspace": workspace, "pushed": True, "records": 5}
    assert_no_secrets(runs_root / "cand-push", argilla_server.api_key, argilla_server.owner_password,
                      texts=(result.stdout, result.stderr))

    client = argilla_server.client()
    remote = list(client.datasets(name=dataset, workspace=workspace).records)
    assert sorted(record.id for record in remote) == sorted(r["prompt_id"] for r in records)
    by_id = {r["prompt_id"]: r for r in records}
    for record in remote:
        shown = sorted(record.fields[f"candidate_{i}"] for i in range(1, 4))
        pushed = [c["text"] if c["text"].strip() else "(empty response)" for c in by_id[record.id]["candidates"]]
        assert shown == sorted(pushed)
        assert record.metadata["checkpoint"] == str(runs_root / tiny_sft_run / "sft")


def test_a_vllm_engine_that_cannot_start_is_one_line(runs_root, tiny_sft_run, tiny_data):
    """Asked for by name, an engine that fails to start (no room for one KV block here) ends the
    stage with one line naming vLLM's cause and what to change; nothing looks finished."""
    result = run_stage("candidates", "--run", "no-engine", "--sft_dir", str(runs_root / tiny_sft_run / "sft"),
                       "--prompts_file", str(tiny_data["prompts"]), "--push", "false", "--suggest_with_reward", "false",
                       "--max_new_tokens", "8", "--k", "2", "--max_prompts", "2", "--generation_backend", "vllm",
                       "--kv_cache_gib", "0.00001")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: generation_backend vllm: the engine did not start (ValueError: ")
    assert "kv_cache_gib (1e-05)" in line and "Traceback" not in result.stderr
    assert not (runs_root / "no-engine" / "candidates").exists()


def test_auto_falls_back_to_transformers_when_vllm_cannot_start(runs_root, tiny_sft_run, tiny_data, tmp_path,
                                                                monkeypatch):
    """`generation_backend: auto` with a benchmark on record that chose vLLM (a real record, in a
    cache folder of the test's own): vLLM fails to start, the stage says so and samples with
    transformers."""
    from align import hardware

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    hardware.record_backend_choice("vllm", "float32", {"vllm float32": 300.0, "hf float32": 100.0}, "tiny")
    result = run_stage("candidates", "--run", "fallback", "--sft_dir", str(runs_root / tiny_sft_run / "sft"),
                       "--prompts_file", str(tiny_data["prompts"]), "--push", "false", "--suggest_with_reward", "false",
                       "--max_new_tokens", "8", "--k", "2", "--max_prompts", "2", "--generation_backend", "auto",
                       "--kv_cache_gib", "0.00001")
    assert_ok(result)
    assert "[generation] vllm did not start (ValueError: " in result.stderr
    assert "generation_backend auto falls back to transformers" in result.stderr
    manifest, records = read_output(runs_root, "fallback")
    assert manifest["generation"]["backend"].startswith("hf") and len(records) == 2
