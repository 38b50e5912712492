"""Human verdict of the compare stage: the blind A/B pairs and verdict (align/ab_test.py)
against hand-computed cases, then the round trip through a real local Argilla server.

A real compare run on tiny checkpoints (tests/fakes.py builds them), then
`stages.compare_human --action push` pushes its responses, an annotator answers through
the REST API as the web UI does (token login), and `stages.compare_human --action pull`
decodes the sides and adds the human win rate to the report.
"""

import json

import httpx
import pytest

from align import ab_test, argilla_io, comparison, reports, runs
from tests.conftest import assert_ok, run_stage
from tests.fakes import make_compare_run

WORKSPACE = "compare-test"


# ----------------------------------------------------------------------------- pairs and verdict, hand-computed


def test_human_comparison_majority_per_pair_and_reward_model_agreement():
    mapping = [{"pair_id": f"p{i}", "aligned": "dpo", "baseline": "sft", "reward": {"dpo": r, "sft": 0.0}}
               for i, r in enumerate([1.0, 1.0, -1.0, 1.0])]

    def answer(pid, winner, who):
        return {"pair_id": pid, "models": {"A": "sft", "B": "dpo"}, "winner": winner, "annotator": who}

    answers = [answer("p0", "dpo", "ann"), answer("p0", "dpo", "bob"),  # dpo
               answer("p1", "dpo", "ann"), answer("p1", "sft", "bob"),  # split -> tie
               answer("p2", "sft", "ann"),                              # sft
               answer("p3", "tie", "ann")]
    human = ab_test.human_comparison(answers, mapping, "dpo", "sft")
    assert (human["wins"], human["losses"], human["ties"]) == (1, 1, 2)
    assert human["rate"] == 0.5 and human["answers"] == 6 and human["pairs_answered"] == 4
    assert human["annotators"] == ["ann", "bob"]
    # decided pairs: p0 (humans dpo, reward dpo) and p2 (humans sft, reward sft): agreement 2/2
    assert human["reward_model_agreement"] == 1.0 and human["reward_model_agreement_pairs"] == 2
    with pytest.raises(ValueError, match="mapping"):
        ab_test.human_comparison([{**answer("p0", "dpo", "x"), "models": {"A": "x", "B": "y"}}], mapping, "dpo", "sft")


def test_ab_items_pair_the_same_sample_and_hide_the_models():
    prompt = [{"role": "user", "content": "Q?"}]

    def row(model, pid, sample, text, reward):
        return {"model": model, "prompt_id": pid, "sample": sample, "prompt": prompt, "text": text, "reward": reward}

    rows = [row("sft", "p1", 0, "s10", 0.1), row("sft", "p1", 1, "s11", 0.2), row("dpo", "p1", 0, "d10", 0.5),
            row("dpo", "p1", 1, "d11", 0.0), row("sft", "p2", 0, "same", 0.3), row("dpo", "p2", 0, "same", 0.3)]
    items, mapping, identical = ab_test.ab_items("r", rows, "dpo", "sft", samples_per_prompt=2)
    assert identical == 1  # p2: identical responses, nothing to judge
    assert [m["prompt_id"] for m in mapping] == ["p1", "p1"] and [m["sample"] for m in mapping] == [0, 1]
    assert items[0]["responses"] == {"dpo": "d10", "sft": "s10"} and items[1]["responses"] == {"dpo": "d11", "sft": "s11"}
    assert mapping[0]["reward"] == {"dpo": 0.5, "sft": 0.1}
    assert all(item["pair_id"].startswith("ab-") and "dpo" not in item["pair_id"] for item in items)
    # new responses (a new compare run) give new record ids: old answers never attach to new texts
    changed = [dict(r, text=r["text"] + "!") if r["model"] == "dpo" else r for r in rows]
    assert ab_test.ab_items("r", changed, "dpo", "sft", 2)[0][0]["pair_id"] != items[0]["pair_id"]
    assert len(ab_test.ab_items("r", rows, "dpo", "sft", samples_per_prompt=1)[0]) == 1


# ----------------------------------------------------------------------------- through a real Argilla server


@pytest.fixture(scope="module")
def pushed(runs_root, tiny_model_dir, tiny_data, argilla_server, monkeypatch_module):
    """A finished compare run whose A/B pairs are in Argilla, and an annotator account."""
    monkeypatch_module.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch_module.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    run = "cmp-ab"
    # temperature 0.7: the two nearly equal tiny models give 6 distinct A/B pairs (at 1.0, with one seed for
    # both models, some of their 12-token answers coincide and are rightly left out of the push)
    assert_ok(make_compare_run(run, tiny_model_dir, tiny_data["prompts"], "--max_prompts", "6", "--temperature", "0.7"))
    dataset = f"compare-{run}"
    result = run_stage("compare_human", "--action", "push", "--run", run, "--argilla_workspace", WORKSPACE)
    assert_ok(result)
    client = argilla_server.client()
    creds = argilla_io.create_annotators(client, WORKSPACE, ["ab-judge"], out=lambda line: None)
    return {"run": run, "dataset": dataset, "client": client, "password": creds[0]["password"],
            "folder": runs.stage_dir(run, "compare"), "stdout": result.stdout}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def raw_records(client, dataset_name: str) -> dict[str, dict]:
    dataset = client.datasets(name=dataset_name, workspace=WORKSPACE)
    page = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records", params={"limit": 1000}).json()
    return {record["external_id"]: record for record in page["items"]}


def test_push_is_blind_and_keeps_the_mapping(pushed):
    folder = pushed["folder"]
    mapping = [json.loads(line) for line in (folder / ab_test.AB_PAIRS).read_text().splitlines()]
    rows = comparison.read_samples(folder)
    records = raw_records(pushed["client"], pushed["dataset"])
    assert len(mapping) == 6 and set(records) == {m["pair_id"] for m in mapping}
    texts = {(r["model"], r["prompt_id"], r["sample"]): r["text"] for r in rows}
    sides_seen = set()
    for m in mapping:
        record = records[m["pair_id"]]
        assert "dpo" not in m["pair_id"] and "sft" not in m["pair_id"]  # opaque id
        a, b = record["metadata"]["model_a"], record["metadata"]["model_b"]
        assert {a, b} == {"dpo", "sft"} and m["sample"] == 0
        sides_seen.add(a)
        # exactly the responses the reward model scored, on the sides the metadata says
        assert record["fields"]["response_a"] == texts[(a, m["prompt_id"], 0)]
        assert record["fields"]["response_b"] == texts[(b, m["prompt_id"], 0)]
    assert sides_seen == {"dpo", "sft"}, "sides should be randomised across 6 records"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["argilla"]["dataset"] == pushed["dataset"] and manifest["argilla"]["pairs"] == 6
    assert "pushed 6 blind A/B pairs" in pushed["stdout"]


def test_pull_decodes_sides_and_adds_the_human_win_rate(pushed, argilla_server):
    folder, client = pushed["folder"], pushed["client"]
    before = run_stage("compare_human", "--action", "pull", "--run", pushed["run"])
    assert_ok(before)
    assert "no submitted answers yet" in before.stdout

    mapping = [json.loads(line) for line in (folder / ab_test.AB_PAIRS).read_text().splitlines()]
    records = raw_records(client, pushed["dataset"])
    token = httpx.post(f"{argilla_server.url}/api/v1/token", data={"username": "ab-judge", "password": pushed["password"]},
                       timeout=60).json()["access_token"]
    # the judge prefers dpo on 4 pairs, sft on 1, tie on 1; the judge must click the side where that model is shown
    wanted = ["dpo", "dpo", "sft", "dpo", "tie", "dpo"]
    for m, winner in zip(mapping, wanted):
        record = records[m["pair_id"]]
        label = "tie" if winner == "tie" else ("A" if record["metadata"]["model_a"] == winner else "B")
        response = httpx.post(f"{argilla_server.url}/api/v1/records/{record['id']}/responses",
                              headers={"Authorization": f"Bearer {token}"},
                              json={"status": "submitted", "values": {ab_test.PREFERENCE: {"value": label}}},
                              timeout=60)
        assert response.status_code == 201, response.text

    result = run_stage("compare_human", "--action", "pull", "--run", pushed["run"])
    assert_ok(result)
    results = json.loads((folder / reports.REPORT_JSON).read_text())
    human = results["comparisons"][0]["human"]
    assert (human["wins"], human["losses"], human["ties"]) == (4, 1, 1)
    assert human["rate"] == pytest.approx(0.8) and human["low"] < 0.8 < human["high"]
    assert human["annotators"] == ["ab-judge"] and human["answers"] == 6 and human["pairs_pushed"] == 6
    # agreement: decided pairs where the reward model's margin has the humans' sign
    decided = [(m, w) for m, w in zip(mapping, wanted) if w != "tie"]
    agree = sum((m["reward"]["dpo"] - m["reward"]["sft"] > 0) == (w == "dpo") for m, w in decided)
    assert human["reward_model_agreement"] == pytest.approx(agree / len(decided))

    report = (folder / reports.REPORT_MD).read_text()
    assert "**human win rate** | 80% [" in report and "Not collected yet" not in report
    assert f"`{pushed['dataset']}`" in report
    assert "human win rate 80%" in result.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["dpo_human_rate"] == pytest.approx(0.8) and manifest["argilla"]["answers"] == 6
    assert manifest["argilla"]["dataset"] == pushed["dataset"]  # kept from the push
    answers = [json.loads(line) for line in (folder / ab_test.HUMAN_ANSWERS).read_text().splitlines()]
    assert sorted(a["winner"] for a in answers) == sorted(wanted)
