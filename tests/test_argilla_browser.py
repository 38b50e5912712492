"""An annotator ranks candidates in the real Argilla web UI (Playwright + Debian's chromium).

Signs in on the sign-in page, opens the dataset from the home page, ranks the
three responses of the record with the keyboard (a tie for best), submits, and
checks that `pull_rankings` returns that ranking mapped back through the shuffle.
A screenshot of the ranking view is saved to tests/artifacts/argilla_ranking.png.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from align import argilla_io as aio

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the browser fixture
    expect = None

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "argilla_ranking.png"
UI_TIMEOUT_MS = 120_000  # a loaded 2-core machine renders slowly


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run `make argilla-browser-deps` (Debian package chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing from the project venv", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def _rank_with_keyboard(page, option: str, rank: int, tries: int = 5) -> None:
    """Focus a response card and press its rank's digit; wait until the card sits in that slot.

    The ranking widget re-renders after each move, so a key pressed too early can be
    lost on a busy machine: press again until the card has landed.
    """
    label = page.locator(".draggable__slot-box--ranking", has_text=re.compile(rf"^\s*{rank}\s*$"))
    landed = page.locator(".draggable__slot").filter(has=label).locator(f"#{option}")
    for attempt in range(tries):
        page.locator(f"#{option}").focus()
        page.keyboard.press(str(rank))
        try:
            expect(landed).to_be_visible(timeout=10_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


def _poll(fn, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_annotator_ranks_in_the_web_ui(argilla_server, browser, unique_name):
    client = argilla_server.client()
    workspace, name = "ui-test", unique_name("ui-ranking")
    ds = aio.create_ranking_dataset(client, name, workspace, k=3, min_submitted=1)
    pid = "soup-1"
    candidates = ["Simmer it for an hour.", "Boil it hard for five minutes.", "Serve it cold, never cooked."]
    aio.push_candidates(
        ds,
        [{"prompt_id": pid, "prompt": [{"role": "user", "content": "How do I cook a lentil soup?"}],
          "candidates": candidates, "metadata": {"checkpoint": "sft@ui"}}],
    )
    (user,) = aio.create_annotators(client, workspace, ["uma"], out=lambda s: None)
    order = aio.shuffle_order(pid, 3)  # position j shows candidates[order[j]]
    # The annotator's judgement on the ORIGINAL candidates: 0 and 1 tie for best, 2 is worst.
    wanted = [1, 1, 2]

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page.goto(f"{argilla_server.url}/sign-in")
        page.get_by_label("Username").fill("uma")
        page.get_by_label("Password").fill(user["password"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "sign-in" not in url)

        page.get_by_text(name, exact=True).first.click()  # the dataset, from the home page
        page.locator("#candidate_1").wait_for()
        for j in range(3):  # the shuffled texts are on screen under "Response j+1"
            page.get_by_text(candidates[order[j]]).wait_for()
        # the prompt sits in Argilla's chat field: a bubble under its role, not markdown text
        page.get_by_text("How do I cook a lentil soup?", exact=True).wait_for()
        assert page.get_by_text("**User:**").count() == 0

        for j in range(3):
            _rank_with_keyboard(page, f"candidate_{j + 1}", wanted[order[j]])
        page.locator("label[for=best_quality_4]").click()
        submit = page.locator("button.button--submit")
        expect(submit).to_be_enabled()
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACT))
        submit.click()

        rows = _poll(lambda: aio.pull_rankings(client, name, workspace))
    finally:
        page.close()

    assert rows, "the submitted ranking did not reach the server"
    assert rows.problems == []
    (row,) = rows
    assert row["annotator"] == "uma" and row["prompt_id"] == pid
    assert [r["text"] for r in row["responses"]] == candidates
    assert [r["rank"] for r in row["responses"]] == wanted
    raw = client.http_client.get(f"/api/v1/datasets/{ds.id}/records", params={"include": ["responses"]}).json()
    (response,) = raw["items"][0]["responses"]
    assert response["status"] == "submitted" and response["values"][aio.RATING]["value"] == 4
