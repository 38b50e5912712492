"""The Argilla server going away under a push or a pull (align/argilla_io.py `retrying`): bounded
retries, then one line naming the server; a push repeated after the restart adds no duplicates.
The real server, really stopped and started (tests/argilla_fixtures.py)."""

from __future__ import annotations

import threading
import time

import pytest

from align import argilla_io as aio
from align.errors import AlignError


def ranking_items(count: int) -> list[dict]:
    return [{"prompt_id": f"fault-{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "candidates": [f"Answer {i}.{j}" for j in range(3)]} for i in range(count)]


def remote_ids(argilla_server, name: str, workspace: str) -> list[str]:
    dataset = argilla_server.client().datasets(name=name, workspace=workspace)
    return sorted(record.id for record in dataset.records)


def test_a_server_that_stays_down_is_one_line_naming_it_and_a_later_push_adds_no_duplicates(argilla_server,
                                                                                            unique_name):
    name, workspace = unique_name("fault"), unique_name("ws")
    dataset = aio.create_ranking_dataset(argilla_server.client(), name, workspace, k=3, guidelines="Rank.",
                                         min_submitted=1)
    items = ranking_items(4)
    aio.push_candidates(dataset, items[:2])
    said: list[str] = []
    argilla_server.stop()
    try:
        with pytest.raises(aio.ArgillaUnavailable) as error:
            aio.retrying("pushing 4 records", argilla_server.url, lambda: aio.push_candidates(dataset, items),
                         waits=(0.2, 0.2), say=said.append)
        with pytest.raises(aio.ArgillaUnavailable):  # a pull: nothing read, nothing to write
            aio.retrying("pulling rankings", argilla_server.url,
                         lambda: aio.pull_rankings(dataset._client, name, workspace), waits=(0.2,), say=said.append)
    finally:
        argilla_server.start()
    message = str(error.value)
    assert message.startswith(f"Argilla at {argilla_server.url} did not answer while pushing 4 records (3 attempts")
    assert "\n" not in message and "run the same command again" in message and argilla_server.api_key not in message
    assert len(said) == 3 and said[0].startswith("[argilla] pushing 4 records: ")

    again = argilla_server.client().datasets(name=name, workspace=workspace)
    aio.push_candidates(again, items)
    aio.push_candidates(again, items)  # twice: records are upserted by id
    assert remote_ids(argilla_server, name, workspace) == sorted(item["prompt_id"] for item in items)


def test_a_server_that_comes_back_within_the_retries_is_waited_for(argilla_server, unique_name):
    name, workspace = unique_name("back"), unique_name("ws")
    dataset = aio.create_ranking_dataset(argilla_server.client(), name, workspace, k=3, guidelines="Rank.",
                                         min_submitted=1)
    items = ranking_items(3)
    said: list[str] = []
    argilla_server.stop()
    # back after 12 s, longer than the SDK's own connection retries (httpx, 5 with backoff, ~7.5 s)
    restart = threading.Thread(target=lambda: (time.sleep(12), argilla_server.start()))
    restart.start()
    try:
        ids = aio.retrying("pushing 3 records", argilla_server.url, lambda: aio.push_candidates(dataset, items),
                           waits=(5, 10, 20, 40, 80), say=said.append)
    finally:
        restart.join()
    assert said, "the server was up before the first attempt: nothing was retried"
    assert sorted(ids) == remote_ids(argilla_server, name, workspace) == sorted(item["prompt_id"] for item in items)


def test_an_answer_that_is_not_a_dropout_is_not_retried(argilla_server, unique_name):
    said: list[str] = []
    client, workspace = argilla_server.client(), unique_name("ws")
    aio.ensure_workspace(client, workspace)
    with pytest.raises(AlignError) as error:  # the server answered: asking again cannot help
        aio.retrying("reading a dataset", argilla_server.url,
                     lambda: aio.find_dataset(client, unique_name("missing"), workspace), say=said.append)
    assert said == [] and "not found in workspace" in str(error.value)
