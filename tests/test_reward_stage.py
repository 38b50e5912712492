"""The reward stage end to end on the tiny model: a good run passes its gate, a model
trained on inverted preferences fails it loudly, and later stages see the failure."""

from __future__ import annotations

import json
import re

import pytest

from align import data, files, preferences
from align.errors import AlignError, DataError
from tests.argilla_fixtures import assert_no_secrets
from tests.conftest import assert_ok, run_stage, write_jsonl

FAST = ("--max_steps", "24", "--per_device_train_batch_size", "4", "--learning_rate", "0.003",
        "--logging_steps", "4", "--warmup_steps", "0", "--precision", "fp32")


def manifest(runs_root, run: str) -> dict:
    return json.loads((runs_root / run / "reward" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def good_run(runs_root, tiny_sft_run, tiny_data) -> str:
    result = run_stage("reward", "--run", tiny_sft_run, "--ranked_files", str(tiny_data["ranked"]), *FAST,
                       "--gate_max_abs_length_corr", "0.95", "--lora_top_layers", "1")
    assert_ok(result)
    assert "[reward] gate PASS" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return tiny_sft_run


def test_reward_run_outputs_and_gate(runs_root, good_run):
    folder = runs_root / good_run / "reward"
    facts = manifest(runs_root, good_run)
    metrics = facts["metrics"]
    assert facts["status"] == "complete"
    assert facts["parent"]["stage"] == "sft"  # lineage: the SFT manifest named the starting model
    assert metrics["gate_passed"] is True and metrics["gate_reasons"] == []
    assert metrics["pairwise_accuracy"] >= 0.9
    assert metrics["pairs"] == 16 * 3 and metrics["bad_rankings"] == 0
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == 48
    # Cost accounting: training in the stage's precision, the held-out gate scored in score_dtype (fp32)
    phases = metrics["cost"]["phases"]
    assert set(phases) == {"train", "eval", "total"} and phases["eval"]["dtype"] == "float32"
    assert all(row["tokens"] > 0 and 0 < row["peak_fraction"] < 1 for row in phases.values()), phases
    assert (folder / "model" / "config.json").is_file() and not (folder / "model" / "adapter_config.json").exists()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert adapter["layers_to_transform"] == [1]  # lora_top_layers 1 of the tiny model's 2
    report = (folder / "report.md").read_text()
    assert "Quality gate: PASSED" in report and "calibration.png" in report and "length.png" in report
    card = (folder / "model" / "README.md").read_text()  # the model card (align/model_card.py)
    assert "## Quality gate: PASSED" in card and "pipeline_tag: text-classification" in card
    assert facts["parent"]["manifest_sha256"] in card
    assert (folder / "calibration.png").stat().st_size > 1000 and (folder / "length.png").stat().st_size > 1000
    # No prompt on both sides of the split.
    train = {obj["prompt_id"] for _, obj in files.read_jsonl(folder / "pairs" / "train.jsonl")}
    heldout = {obj["prompt_id"] for _, obj in files.read_jsonl(folder / "pairs" / "heldout.jsonl")}
    assert train and heldout and not train & heldout
    # The data's and the model's length preference, from the recorded held-out scores and lengths.
    rows = files.read_jsonl_records(folder / "heldout_scores.jsonl")
    longer_higher = [(r["chosen_tokens"] > r["rejected_tokens"] and r["r_chosen"] > r["r_rejected"])
                     or (r["rejected_tokens"] > r["chosen_tokens"] and r["r_rejected"] > r["r_chosen"]) for r in rows]
    assert metrics["longer_scored_higher_fraction"] == pytest.approx(sum(longer_higher) / len(rows))
    assert metrics["chosen_longer_fraction"] == pytest.approx(
        sum(r["chosen_tokens"] > r["rejected_tokens"] for r in rows) / len(rows))
    assert f"scores the longer one higher in {metrics['longer_scored_higher_fraction']:.0%}" in report


def test_saved_model_reproduces_recorded_scores(runs_root, good_run):
    """What a later stage loads (load_reward_checkpoint) scores exactly what the gate measured."""
    from align.scoring import load_reward_checkpoint

    folder = runs_root / good_run / "reward"
    scorer = load_reward_checkpoint(good_run, gate_policy="refuse")
    pairs = files.read_jsonl_records(folder / "pairs" / "heldout.jsonl")
    recorded = files.read_jsonl_records(folder / "heldout_scores.jsonl")
    chosen, rejected = scorer.score_pairs(pairs)
    assert chosen == pytest.approx([row["r_chosen"] for row in recorded], abs=1e-4)
    assert rejected == pytest.approx([row["r_rejected"] for row in recorded], abs=1e-4)


def test_gate_fails_for_a_model_trained_on_inverted_preferences(runs_root, tiny_sft_run, tiny_data, tmp_path, capsys):
    """Invert the rankings of the training prompts only: the model learns the opposite
    preference, the held-out pairs (true labels) expose it, the gate fails loudly."""
    records = data.load_ranked(tiny_data["ranked"])
    pairs, _ = preferences.ranked_to_pairs(records)
    train_pairs, _ = preferences.split_by_prompt(pairs, 0.2, seed=42)
    train_ids = {pair["prompt_id"] for pair in train_pairs}
    inverted = []
    for record in records:
        record = {key: value for key, value in record.items() if key != "source"}
        if record["prompt_id"] in train_ids:
            top = len(record["responses"]) + 1
            record["responses"] = [{"text": r["text"], "rank": top - r["rank"]} for r in record["responses"]]
        inverted.append(record)
    path = write_jsonl(tmp_path / "inverted.jsonl", inverted)

    run = "inverted"
    (runs_root / run).mkdir()
    (runs_root / run / "sft").symlink_to(runs_root / tiny_sft_run / "sft")
    result = run_stage("reward", "--run", run, "--ranked_files", str(path), *FAST)
    assert_ok(result)  # the stage completes; the verdict is in the report and manifest
    assert "FAILED its quality gate" in result.stderr and "[reward] gate FAIL" in result.stdout
    metrics = manifest(runs_root, run)["metrics"]
    assert metrics["gate_passed"] is False
    assert metrics["pairwise_accuracy"] < 0.5
    assert any(reason.startswith("pairwise_accuracy") for reason in metrics["gate_reasons"])
    assert "Quality gate: FAILED" in (runs_root / run / "reward" / "report.md").read_text()

    from align.scoring import load_reward_checkpoint

    with pytest.raises(AlignError, match="FAILED its quality gate"):
        load_reward_checkpoint(run, gate_policy="refuse")
    capsys.readouterr()
    load_reward_checkpoint(run, gate_policy="warn")
    assert "FAILED its quality gate" in capsys.readouterr().err


def test_bad_rankings_refused_with_file_and_line(runs_root, tiny_sft_run, tiny_data, tmp_path):
    lines = tiny_data["ranked"].read_text().splitlines()
    bad = json.loads(lines[2])
    bad["responses"][0]["rank"] = 7  # out of range for 3 responses
    lines[2] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = run_stage("reward", "--run", tiny_sft_run, "--ranked_files", str(path), "--bad_rankings", "refuse")
    assert result.returncode == 2
    assert re.search(rf"{re.escape(str(path))}:3: responses\[0\]\.rank: rank 7 is out of range", result.stderr)
    # Refused before anything was written: no new reward output, no failed folder.
    assert not list((runs_root / tiny_sft_run).glob("reward.failed-*"))
    with pytest.raises(DataError):
        preferences.ranked_to_pairs(data.load_ranked(path), bad_rankings="refuse")


def test_rankings_pulled_from_argilla(runs_root, tiny_sft_run, tiny_data, argilla_server, unique_name, monkeypatch):
    """An annotator ranks in a real Argilla server; the stage pulls, saves and trains on it
    together with the ranked file (two annotators who agree on every prompt)."""
    from align import argilla_io
    from tests.test_argilla import Annotator

    records = data.load_ranked(tiny_data["ranked"])
    client = argilla_server.client()
    workspace, name, user = unique_name("rw"), unique_name("reward"), unique_name("ranker")
    dataset = argilla_io.create_ranking_dataset(client, name, workspace, k=3, guidelines="Rank.", min_submitted=1)
    items = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "candidates": [x["text"] for x in r["responses"]]}
             for r in records]
    argilla_io.push_candidates(dataset, items)
    password = {c["username"]: c["password"] for c in
                argilla_io.create_annotators(client, workspace, [user], out=lambda s: None)}[user]
    annotator = Annotator(argilla_server.url, user, password)
    raw = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records", params={"limit": 1000}).json()["items"]
    ranks = {r["prompt_id"]: [x["rank"] for x in r["responses"]] for r in records}
    for record in raw:
        order = [int(x) for x in record["metadata"]["candidate_order"].split(",")]  # shown position -> candidate
        shown = {f"candidate_{j + 1}": ranks[record["external_id"]][order[j]] for j in range(3)}
        annotator.respond(record["id"], "submitted", shown)

    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    run = "from-argilla"
    (runs_root / run).mkdir()
    (runs_root / run / "sft").symlink_to(runs_root / tiny_sft_run / "sft")
    result = run_stage("reward", "--run", run, "--ranked_files", str(tiny_data["ranked"]),
                       "--argilla_dataset", name, "--argilla_workspace", workspace, *FAST)
    assert_ok(result)
    folder = runs_root / run / "reward"
    # the key, the owner's and the annotator's passwords: in no file of the stage (TensorBoard
    # events included) and not on the console
    assert_no_secrets(folder, argilla_server.api_key, argilla_server.owner_password, password,
                      texts=(result.stdout, result.stderr))
    pulled = files.read_jsonl_records(folder / "rankings.jsonl")
    assert len(pulled) == 16 and {r["annotator"] for r in pulled} == {user}
    assert all(r["provenance"]["dataset"] == name for r in pulled)
    facts = manifest(runs_root, run)
    assert [i["role"] for i in facts["inputs"]] == ["ranked", "ranked (argilla)"]
    metrics = facts["metrics"]
    assert metrics["annotators"] == 2 and metrics["annotators_per_prompt"] == {"2": 16}
    assert metrics["annotator_agreement"] == 1.0 and metrics["pairs"] == 48


def test_trl_preference_pairs_in_parquet_train_the_stage(runs_root, tiny_sft_run, tiny_data, tmp_path):
    """A downloaded dataset as it comes: TRL's conversational preference format in Parquet, plus one
    malformed row. The stage trains on every good pair and lists the bad row."""
    import pyarrow
    import pyarrow.parquet

    rows = []
    for record in data.load_ranked(tiny_data["ranked"]):
        ranked = sorted(record["responses"], key=lambda response: response["rank"])
        if ranked[0]["rank"] < ranked[-1]["rank"]:
            rows.append({"prompt": record["prompt"], "chosen": [{"role": "assistant", "content": ranked[0]["text"]}],
                         "rejected": [{"role": "assistant", "content": ranked[-1]["text"]}], "score_chosen": 9.0})
    rows.append({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Hi"}],
                 "rejected": [{"role": "assistant", "content": "Hello."}], "score_chosen": None})  # a user answer
    path = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)

    run = "parquet-pairs"
    (runs_root / run).mkdir()
    (runs_root / run / "sft").symlink_to(runs_root / tiny_sft_run / "sft")
    result = run_stage("reward", "--run", run, "--ranked_files", str(path), *FAST, "--gate_max_abs_length_corr", "0.95")
    assert_ok(result)
    facts = manifest(runs_root, run)
    metrics = facts["metrics"]
    assert metrics["pairs"] == len(rows) - 1 and metrics["bad_rankings"] == 1
    assert metrics["train_pairs"] + metrics["heldout_pairs"] + metrics.get("dropped_too_long_train", 0) \
        + metrics.get("dropped_too_long_heldout", 0) == len(rows) - 1
    assert f"{path}:{len(rows)}: chosen[0].role: must be 'assistant'" in result.stderr  # the bad row, named
    assert [entry["sha256"] for entry in facts["inputs"] if entry["path"] == str(path)] == [files.sha256_file(path)]


def test_pairs_of_similar_length_share_a_batch(runs_root, tiny_sft_run, tmp_path):
    """`train_sampling_strategy: group_by_length` batches pairs of similar length (transformers'
    sampler on the `length` column the stage adds): over one epoch of pairs of 1 to ~170 words,
    the stage's cost report shows far less padding than with random batches (the default). TRL
    pads both sides of every pair in a batch to its longest text, so random batches of the
    example data are 85% padding; grouped 23% (a pair's two sides still differ)."""
    import random

    rng = random.Random(0)
    words = [rng.randint(1, 150) for _ in range(160)]  # the two answers to a prompt: within 20 words
    ranked = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
               "responses": [{"text": " ".join(["good"] * count), "rank": 1},
                             {"text": " ".join(["bad"] * (count + rng.randint(0, 20))), "rank": 2}], "annotator": "t"}
              for i, count in enumerate(words)]
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked)
    padding = {}
    for strategy in ("group_by_length", "random"):
        run = f"lengths-{strategy}"
        (runs_root / run).mkdir()
        (runs_root / run / "sft").symlink_to(runs_root / tiny_sft_run / "sft")
        result = run_stage("reward", "--run", run, "--ranked_files", str(path), "--num_train_epochs", "1",
                           "--precision", "fp32", "--lora_top_layers", "1", "--gate_max_abs_length_corr", "1.0",
                           "--train_sampling_strategy", strategy)
        assert_ok(result)
        facts = manifest(runs_root, run)
        assert facts["config"]["train_sampling_strategy"] == strategy
        padding[strategy] = facts["metrics"]["cost"]["phases"]["train"]["padding"]
    assert padding["group_by_length"] < 0.5 * padding["random"], padding  # 0.19 against 0.60 when written
