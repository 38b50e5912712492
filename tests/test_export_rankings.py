"""`make export-rankings` (stages/export_rankings.py) against the real Argilla server: an
annotator submits rankings; the export holds Argilla's own dataset export (re-imported here onto
the server), our ranked JSONL and TRL preference pairs as a `datasets` folder."""

from __future__ import annotations

import json

from align import argilla_io as aio
from align import data, preferences
from tests.argilla_fixtures import assert_no_secrets
from tests.conftest import assert_ok, run_stage


def annotated_dataset(argilla_server, unique_name, ranked_file) -> tuple[str, str, str, list[dict]]:
    """A ranking dataset of the ranked file's prompts, ranked in Argilla as the file ranks them."""
    from tests.test_argilla import Annotator

    records = data.load_ranked(ranked_file)[:6]
    client = argilla_server.client()
    workspace, name, user = unique_name("ex"), unique_name("export"), unique_name("ranker")
    dataset = aio.create_ranking_dataset(client, name, workspace, k=3, guidelines="Rank.", min_submitted=1)
    aio.push_candidates(dataset, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                   "candidates": [x["text"] for x in r["responses"]]} for r in records])
    password = {c["username"]: c["password"] for c in
                aio.create_annotators(client, workspace, [user], out=lambda s: None)}[user]
    annotator = Annotator(argilla_server.url, user, password)
    raw = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records", params={"limit": 1000}).json()["items"]
    ranks = {r["prompt_id"]: [x["rank"] for x in r["responses"]] for r in records}
    for record in raw:
        order = [int(x) for x in record["metadata"]["candidate_order"].split(",")]  # shown position -> candidate
        annotator.respond(record["id"], "submitted",
                          {f"candidate_{j + 1}": ranks[record["external_id"]][order[j]] for j in range(3)})
    return workspace, name, user, records


def test_export_holds_argillas_export_our_rankings_and_trl_pairs(runs_root, argilla_server, unique_name, tiny_data,
                                                               monkeypatch):
    from datasets import load_from_disk

    workspace, name, user, records = annotated_dataset(argilla_server, unique_name, tiny_data["ranked"])
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    result = run_stage("export_rankings", "--run", "exported", "--argilla_dataset", name, "--argilla_workspace", workspace)
    assert_ok(result)
    folder = runs_root / "exported" / "rankings"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["rankings"] == 6

    # ours: the file's rankings came back through the UI's shuffle, rank for rank
    exported = [json.loads(line) for line in (folder / "rankings.jsonl").read_text().splitlines()]
    assert {r["prompt_id"]: [x["rank"] for x in r["responses"]] for r in exported} == \
        {r["prompt_id"]: [x["rank"] for x in r["responses"]] for r in records}
    assert {r["annotator"] for r in exported} == {user}

    # TRL's: the pairs the reward stage builds from the same rankings, as a datasets folder
    pairs = load_from_disk(str(folder / "pairs"))
    expected, _ = preferences.ranked_to_pairs(records)
    assert len(pairs) == len(expected) == manifest["metrics"]["pairs"] == 18
    assert set(pairs.column_names) == {"prompt_id", "prompt", "chosen", "rejected", "margin", "tie"}
    assert pairs[0]["chosen"][0]["role"] == "assistant" and pairs[0]["prompt"][0]["role"] == "user"
    assert {(p["prompt_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs} == \
        {(p["prompt_id"], p["chosen"], p["rejected"]) for p in expected}

    # Argilla's: its own export, which the SDK imports again as a new dataset with every response
    import argilla as rg

    client = argilla_server.client()
    again = rg.Dataset.from_disk(str(folder / "argilla"), name=unique_name("reimported"), workspace=workspace,
                                 client=client)
    assert sorted(record.id for record in again.records) == sorted(r["prompt_id"] for r in records)
    assert sum(len(record.responses) for record in again.records) == 6
    assert_no_secrets(folder, argilla_server.api_key, argilla_server.owner_password,
                      texts=(result.stdout, result.stderr))


def test_push_to_hub_is_refused_offline_before_the_server_is_asked(runs_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:9")  # nothing listens there: it must not be asked
    monkeypatch.setenv("ARGILLA_API_KEY", "never-used-key")
    result = run_stage("export_rankings", "--run", "offline-export", "--push_to_hub", "you/rankings")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "HF_HUB_OFFLINE=1" in line and "make export-rankings" in line
    assert not (runs_root / "offline-export").exists()


def test_a_dataset_nobody_ranked_yet_is_one_line(runs_root, argilla_server, unique_name, monkeypatch):
    client = argilla_server.client()
    workspace, name = unique_name("ex"), unique_name("empty")
    dataset = aio.create_ranking_dataset(client, name, workspace, k=3, guidelines="Rank.", min_submitted=1)
    aio.push_candidates(dataset, [{"prompt_id": "p-1", "prompt": [{"role": "user", "content": "Hi?"}],
                                   "candidates": ["a", "b", "c"]}])
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    result = run_stage("export_rankings", "--run", "nothing-ranked", "--argilla_dataset", name,
                       "--argilla_workspace", workspace)
    assert result.returncode == 2
    assert f"error: Argilla dataset {workspace}/{name}: no submitted rankings yet" in result.stderr
    assert not (runs_root / "nothing-ranked").exists()
