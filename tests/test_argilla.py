"""The human-feedback loop against a real local Argilla server (tests/argilla_fixtures.py).

Annotators answer through the REST API as themselves (token login), as the web UI does.
"""

from __future__ import annotations

import json
import uuid

import argilla as rg
import httpx
import pytest

from tests.conftest import run_stage

from align import ab_test
from align import argilla_io as aio

K = 3


def _item(i: int, suggested=None) -> dict:
    return {
        "prompt_id": f"prompt-{i}",
        "prompt": [
            {"role": "system", "content": "You are a kitchen assistant."},
            {"role": "user", "content": f"How long do I boil egg number {i}?"},
        ],
        "candidates": [f"Reply {i}.{j}: boil it for {4 + j} minutes." for j in range(K)],
        "metadata": {"checkpoint": "sft@0123abcd", "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64},
        "suggested_ranking": suggested,
    }


class Annotator:
    """One annotator talking to the REST API with a bearer token, as the web UI does."""

    def __init__(self, url: str, username: str, password: str):
        self.url = url
        token = httpx.post(f"{url}/api/v1/token", data={"username": username, "password": password}, timeout=60)
        token.raise_for_status()
        self.headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

    def respond(self, record_id: str, status: str, ranks: dict | None = None, extra: dict | None = None) -> dict:
        values = None
        if ranks is not None:
            values = {aio.RANKING: {"value": [{"value": n, "rank": r} for n, r in ranks.items()]}, **(extra or {})}
        r = httpx.post(
            f"{self.url}/api/v1/records/{record_id}/responses",
            headers=self.headers,
            json={"status": status, "values": values},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return r.json()

    def update(self, response_id: str, status: str, values: dict) -> None:
        r = httpx.put(
            f"{self.url}/api/v1/responses/{response_id}",
            headers=self.headers,
            json={"status": status, "values": values},
            timeout=60,
        )
        assert r.status_code == 200, r.text

    def search(self, dataset_id, status: str) -> list[str]:
        """External ids of this user's records with a response status ('pending' = none yet); search engine."""
        r = httpx.post(
            f"{self.url}/api/v1/me/datasets/{dataset_id}/records/search",
            headers=self.headers,
            json={"filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": [status]}]}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return sorted(i["record"]["external_id"] for i in r.json()["items"])


def _raw(client, dataset) -> dict[str, dict]:
    page = client.http_client.get(
        f"/api/v1/datasets/{dataset.id}/records", params={"include": ["responses", "suggestions"], "limit": 1000}
    ).json()
    return {r["external_id"]: r for r in page["items"]}


def _positions(order: list[int], ranks_by_candidate: list[int]) -> dict[str, int]:
    """Ranks for the shown positions (candidate_1..k) given ranks of the original candidates."""
    return {f"candidate_{j + 1}": ranks_by_candidate[order[j]] for j in range(len(order))}


@pytest.fixture(scope="module")
def loop(argilla_server):
    """A ranking dataset with 4 prompts and two annotators' answers in every state."""
    client = argilla_server.client()
    workspace, name = "feedback-test", "ranking-test"
    ds = aio.create_ranking_dataset(client, name, workspace, k=K, guidelines="Rank them.", min_submitted=1)
    items = [_item(0, suggested=[2, 1, 1]), _item(1), _item(2), _item(3)]
    ids = aio.push_candidates(ds, items)
    creds = {r["username"]: r["password"] for r in aio.create_annotators(client, workspace, ["alice", "bob"], out=lambda s: None)}
    alice = Annotator(argilla_server.url, "alice", creds["alice"])
    bob = Annotator(argilla_server.url, "bob", creds["bob"])
    raw = _raw(client, ds)
    order = {pid: [int(x) for x in raw[pid]["metadata"]["candidate_order"].split(",")] for pid in raw}

    # Ranks of the ORIGINAL candidates (index 0..K-1); the annotators see them shuffled.
    alice_0 = [3, 1, 1]  # a tie for best
    alice_3 = [1, 2, 3]
    bob_0 = [1, 2, 3]
    alice.respond(raw["prompt-0"]["id"], "submitted", _positions(order["prompt-0"], alice_0),
                  extra={aio.RATING: {"value": 4}, aio.COMMENT: {"value": "two equally good"}})
    alice.respond(raw["prompt-1"]["id"], "discarded")
    alice.respond(raw["prompt-2"]["id"], "draft", {"candidate_1": 1})  # incomplete draft
    draft = alice.respond(raw["prompt-3"]["id"], "draft", _positions(order["prompt-3"], [3, 2, 1]))
    # ... then changes her mind and submits (an update of an existing response)
    alice.update(
        draft["id"], "submitted",
        {aio.RANKING: {"value": [{"value": n, "rank": r} for n, r in _positions(order["prompt-3"], alice_3).items()]}},
    )
    bob.respond(raw["prompt-0"]["id"], "submitted", _positions(order["prompt-0"], bob_0))
    bob.respond(raw["prompt-2"]["id"], "discarded")
    expected = {("prompt-0", "alice"): alice_0, ("prompt-3", "alice"): alice_3, ("prompt-0", "bob"): bob_0}
    return dict(
        client=client, ds=ds, name=name, workspace=workspace, items=items, ids=ids, raw=raw, order=order,
        alice=alice, bob=bob, creds=creds, expected=expected,
    )


def test_dataset_layout_and_shuffle(loop):
    ds, raw, items = loop["ds"], loop["raw"], loop["items"]
    assert [f.name for f in ds.settings.fields] == ["prompt", "candidate_1", "candidate_2", "candidate_3"]
    assert isinstance(ds.settings.fields["prompt"], rg.ChatField)
    assert ds.settings.questions[aio.RANKING].required
    assert not ds.settings.questions[aio.RATING].required
    assert ds.settings.distribution.min_submitted == 1
    assert ds.settings.guidelines == "Rank them."
    assert loop["ids"] == [it["prompt_id"] for it in items]
    orders = set()
    for item in items:
        rec = raw[item["prompt_id"]]
        order = loop["order"][item["prompt_id"]]
        assert order == aio.shuffle_order(item["prompt_id"], K)  # deterministic
        orders.add(tuple(order))
        for j in range(K):  # position j shows original candidate order[j]
            assert rec["fields"][f"candidate_{j + 1}"] == item["candidates"][order[j]]
        assert rec["fields"]["prompt"] == item["prompt"]  # Argilla's chat field: the messages, roles kept
        meta = rec["metadata"]
        assert meta["prompt_messages"] == item["prompt"]
        assert meta["checkpoint"] == "sft@0123abcd" and meta["temperature"] == 0.8 and meta["max_new_tokens"] == 64
        assert meta["min_candidate_chars"] == min(map(len, item["candidates"]))
    assert len(orders) > 1, "candidate order should differ between records"


def test_suggested_ranking_keeps_ranks_and_ties(loop):
    rec = loop["raw"]["prompt-0"]
    (suggestion,) = rec["suggestions"]
    assert suggestion["agent"] == aio.SUGGESTION_AGENT and suggestion["type"] == "model"
    shown = {v["value"]: v["rank"] for v in suggestion["value"]}
    assert shown == _positions(loop["order"]["prompt-0"], [2, 1, 1])


def test_pull_returns_exactly_the_submitted_rankings(loop):
    rows = aio.pull_rankings(loop["client"], loop["name"], loop["workspace"])
    assert rows.problems == []
    got = {(r["prompt_id"], r["annotator"]): [resp["rank"] for resp in r["responses"]] for r in rows}
    assert got == loop["expected"]  # discarded and draft responses are not there
    items = {it["prompt_id"]: it for it in loop["items"]}
    users = {u.username: str(u.id) for u in loop["client"].users}
    for r in rows:
        item = items[r["prompt_id"]]
        assert [resp["text"] for resp in r["responses"]] == item["candidates"]  # original order
        assert r["prompt"] == item["prompt"]
        prov = r["provenance"]
        assert prov["dataset"] == loop["name"] and prov["record_id"] == r["prompt_id"]
        assert prov["annotator_id"] == users[r["annotator"]]
        assert prov["submitted_at"]
    json.dumps(list(rows))  # the rows are plain JSON


def test_search_index_follows_responses(loop):
    ds, alice, bob = loop["ds"], loop["alice"], loop["bob"]
    assert alice.search(ds.id, "submitted") == ["prompt-0", "prompt-3"]
    assert alice.search(ds.id, "discarded") == ["prompt-1"]
    assert alice.search(ds.id, "draft") == ["prompt-2"]
    assert bob.search(ds.id, "pending") == ["prompt-1", "prompt-3"]


def test_status_counts(loop):
    (row,) = [r for r in aio.dataset_status(loop["client"]) if r["dataset"] == loop["name"]]
    assert row["workspace"] == loop["workspace"]
    assert row["records"] == {"total": 4, "completed": 2, "pending": 2}
    assert row["annotators"]["alice"] == {"submitted": 2, "discarded": 1, "draft": 1}
    assert row["annotators"]["bob"] == {"submitted": 1, "discarded": 1, "draft": 0}


def test_repush_upserts_without_duplicates(loop):
    client, ds = loop["client"], loop["ds"]
    changed = [dict(it, metadata={**it["metadata"], "checkpoint": "sft@second"}) for it in loop["items"]]
    assert aio.push_candidates(ds, changed) == loop["ids"]
    raw = _raw(client, ds)
    assert sorted(raw) == sorted(loop["ids"])
    assert {r["metadata"]["checkpoint"] for r in raw.values()} == {"sft@second"}
    rows = aio.pull_rankings(client, loop["name"], loop["workspace"])
    assert {(r["prompt_id"], r["annotator"]) for r in rows} == set(loop["expected"])  # responses kept


def test_existing_annotator_is_added_not_recreated(loop, unique_name):
    client = loop["client"]
    other = unique_name("ws")
    lines: list[str] = []
    (res,) = aio.create_annotators(client, other, ["alice"], out=lines.append)
    assert res == {"username": "alice", "created": False, "added": True, "password": None}
    assert any("password unchanged" in line for line in lines)
    Annotator(loop["alice"].url, "alice", loop["creds"]["alice"])  # old password still works
    (res,) = aio.create_annotators(client, other, ["alice"], out=lines.append)
    assert res["added"] is False
    assert len(loop["creds"]["bob"]) >= 8


def test_invalid_ranking_is_reported_not_used(argilla_server, unique_name):
    client = argilla_server.client()
    name = unique_name("broken")
    ds = aio.create_ranking_dataset(client, name, "feedback-test", k=2, min_submitted=1)
    aio.push_candidates(ds, [dict(_item(7), candidates=["a", "b"])])
    (creds,) = aio.create_annotators(client, "feedback-test", ["carol"], out=lambda s: None)
    carol = Annotator(argilla_server.url, "carol", creds["password"])
    rec = _raw(client, ds)["prompt-7"]
    carol.respond(rec["id"], "submitted", {"candidate_1": 1, "candidate_2": 2})
    # Break the stored shuffle mapping: the answer can no longer be mapped back.
    r = client.http_client.patch(
        f"/api/v1/records/{rec['id']}", json={"metadata": {**rec["metadata"], "candidate_order": "0,0"}}
    )
    assert r.status_code == 200, r.text
    rows = aio.pull_rankings(client, name, "feedback-test")
    assert list(rows) == []
    assert rows.problems == [
        {"record_id": "prompt-7", "annotator": "carol", "problem": "record metadata has no valid candidate_order for k=2"}
    ]


def test_check_ranking_rejects_bad_values():
    names = ["candidate_1", "candidate_2"]
    assert aio._check_ranking([{"value": "candidate_1", "rank": 1}, {"value": "candidate_2", "rank": 1}], names)[1] is None
    assert "not ranked" in aio._check_ranking([{"value": "candidate_1", "rank": 1}], names)[1]
    assert "twice" in aio._check_ranking([{"value": "candidate_1", "rank": 1}] * 2, names)[1]
    assert "rank 3" in aio._check_ranking(
        [{"value": "candidate_1", "rank": 3}, {"value": "candidate_2", "rank": 1}], names
    )[1]


def test_push_rejects_wrong_candidate_count(loop):
    with pytest.raises(aio.AlignError, match="list of 3 strings"):
        aio.push_candidates(loop["ds"], [dict(_item(9), candidates=["only one"])])


def test_ab_round_trip_decodes_sides(argilla_server, loop, unique_name):
    client = argilla_server.client()
    name = unique_name("ab")
    ds = ab_test.create_ab_dataset(client, name, loop["workspace"], min_submitted=1)
    pairs = [
        {
            "pair_id": f"pair-{i}",
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "responses": {"dpo": f"dpo answer {i}", "sft": f"sft answer {i}"},
            "metadata": {"run": "r1"},
        }
        for i in range(6)
    ]
    ab_test.push_ab_pairs(ds, pairs)
    ab_test.push_ab_pairs(ds, pairs)  # upsert, no duplicates
    raw = _raw(client, ds)
    assert len(raw) == 6
    sides = {pid: ab_test.ab_sides(pid, ["dpo", "sft"]) for pid in raw}
    assert len(set(sides.values())) == 2, "both side assignments should occur in 6 pairs"
    for pid, (a, b) in sides.items():
        assert raw[pid]["fields"]["response_a"].startswith(a)
        assert raw[pid]["fields"]["response_b"].startswith(b)
    # alice prefers dpo everywhere except a tie on pair-5; she must pick the side where dpo is.
    alice = loop["alice"]
    for pid, (a, _b) in sides.items():
        label = "tie" if pid == "pair-5" else ("A" if a == "dpo" else "B")
        r = httpx.post(
            f"{alice.url}/api/v1/records/{raw[pid]['id']}/responses",
            headers=alice.headers,
            json={"status": "submitted", "values": {ab_test.PREFERENCE: {"value": label}}},
            timeout=60,
        )
        assert r.status_code == 201, r.text
    rows = ab_test.pull_ab_answers(client, name, loop["workspace"])
    assert rows.problems == []
    winners = {r["pair_id"]: r["winner"] for r in rows}
    assert winners == {f"pair-{i}": ("tie" if i == 5 else "dpo") for i in range(6)}
    for r in rows:
        assert r["annotator"] == "alice" and r["provenance"]["record_id"] == r["pair_id"]
        assert set(r["models"].values()) == {"dpo", "sft"}


def test_connect_uses_local_credentials_and_never_prints_the_key(argilla_server, monkeypatch, capsys):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    monkeypatch.setenv("ARGILLA_LOCAL_HOME", str(argilla_server.home))
    client = aio.connect()
    assert client.me.username == argilla_server.owner
    aio.create_annotators(client, "feedback-test", ["alice"])
    status = run_stage("argilla_status")  # as a user runs it (nothing imports a stage)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "ranking-test" in status.stdout
    out = capsys.readouterr()
    assert argilla_server.api_key not in status.stdout + status.stderr + out.out + out.err
    mode = (argilla_server.home / "credentials.json").stat().st_mode & 0o777
    assert mode == 0o600

    monkeypatch.setenv("ARGILLA_LOCAL_HOME", str(argilla_server.home / "nowhere"))
    with pytest.raises(aio.ArgillaUnavailable, match="make argilla"):
        aio.connect()


def test_a_wrong_key_is_one_line_that_does_not_hold_the_key(argilla_server, tiny_data, monkeypatch, tmp_path):
    """A stage given a key the server refuses: exit 2, one line naming the server, neither the
    wrong key nor the real one in it, and nothing under runs/."""
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", wrong)
    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    with pytest.raises(aio.ArgillaUnavailable) as error:
        aio.connect()
    assert wrong not in str(error.value) and argilla_server.url in str(error.value)
    result = run_stage("reward", "--run", "wrong-key", "--model_name_or_path", "default",
                       "--ranked_files", str(tiny_data["ranked"]), "--argilla_dataset", "anything")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot reach Argilla at {argilla_server.url}" in line and "Traceback" not in result.stderr
    for secret in (wrong, argilla_server.api_key):
        assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()


def test_restart_keeps_data_and_rebuilds_the_index(argilla_server, loop):
    """Runs last in this module: the data survives a restart; osmem's in-memory index is rebuilt."""
    info = argilla_server.restart()
    assert info["url"] == argilla_server.url and not info["already_running"]
    again = argilla_server.start()
    assert again["already_running"]
    client = argilla_server.client()
    rows = aio.pull_rankings(client, loop["name"], loop["workspace"])
    got = {(r["prompt_id"], r["annotator"]): [resp["rank"] for resp in r["responses"]] for r in rows}
    assert got == loop["expected"]
    alice = Annotator(argilla_server.url, "alice", loop["creds"]["alice"])
    assert alice.search(loop["ds"].id, "submitted") == ["prompt-0", "prompt-3"]  # answered from the rebuilt index
