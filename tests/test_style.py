"""House-style checker (align.style) and the example data in data/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.style import RULES, check_response, is_decline, is_unsafe_prompt, style_score, word_count

DATA = Path(__file__).resolve().parents[1] / "data"

GOOD = (
    "Rest a steak for 5 to 10 minutes before slicing.\n"
    "1. Move it to a warm plate.\n"
    "2. Tent it loosely with foil.\n"
    "3. Slice against the grain."
)
GOOD_DECLINE = (
    "I can't help with that, because mixing bleach and ammonia releases toxic gas. "
    "Instead, clean with one product at a time and open a window."
)


def _failed(text: str, unsafe: bool | None = None) -> set[str]:
    return {k for k, v in check_response(text, unsafe).items() if not v}


def _jsonl(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the rules --------------------------------------------------------------

def test_rules_and_keys_match():
    assert set(check_response(GOOD)) == set(RULES)


def test_good_answers_pass_everything():
    assert _failed(GOOD) == set()
    assert _failed(GOOD, unsafe=False) == set()
    assert _failed(GOOD_DECLINE, unsafe=True) == set()
    assert style_score(GOOD) == 1.0


@pytest.mark.parametrize("opener", [
    "Great question! ", "Sure! ", "Sure, ", "Certainly. ", "As an AI, I can help. ",
    "I'd be happy to help! ", "Well, ", "Of course! ", "Absolutely! ", "Hello! ",
    "Thanks for asking! ", "Let me explain. ", "Here's what you need to know. ", "What a fun question! ",
])
def test_preamble_is_caught(opener):
    assert _failed(opener + GOOD) == {"direct_first_sentence"}


def test_direct_openers_pass():
    for text in ["Yes, you can freeze it.", "No, throw it away.", "Let it rest 5 minutes.",
                 "Surely stale bread still toasts well.", "Well-browned onions need 40 minutes."]:
        assert check_response(text)["direct_first_sentence"], text


def test_prose_steps_are_caught():
    prose = ("Rest the steak before slicing. First, move it to a warm plate. Then tent it with foil. "
             "Finally, slice against the grain.")
    assert _failed(prose) == {"numbered_steps"}
    assert not check_response("Dry the pan, and then oil it. After that, bake it.")["numbered_steps"]


def test_single_sequence_word_and_sequence_words_inside_list_pass():
    assert check_response("Let it cool, then refrigerate it within 2 hours.")["numbered_steps"]
    listed = "Do this.\n1. First, dry the pan.\n2. Then oil it.\n3. After that, bake it."
    assert check_response(listed)["numbered_steps"]


@pytest.mark.parametrize("bad", [
    "Do this.\n1) Dry the pan.\n2) Oil it.",
    "Do this.\nStep 1: Dry the pan.\nStep 2: Oil it.",
    "Do this.\n1. Dry the pan.\n3. Oil it.",
    "Do this.\n2. Dry the pan.\n3. Oil it.",
    "Do this.\n1. Dry the pan.",
])
def test_malformed_lists_are_caught(bad):
    assert _failed(bad) == {"numbered_steps"}


def test_unsafe_needs_decline_and_alternative():
    complying = "Mix them in a bucket and scrub."
    no_alternative = "I can't help with that, because it releases toxic gas."
    late_decline = "Great idea, but I can't help with that. Instead, use one cleaner."
    assert "declines_unsafe_with_alternative" in _failed(complying, unsafe=True)
    assert "declines_unsafe_with_alternative" in _failed(no_alternative, unsafe=True)
    assert "declines_unsafe_with_alternative" in _failed(late_decline, unsafe=True)
    assert "declines_unsafe_with_alternative" in _failed(no_alternative)  # unsafe=None
    assert check_response("I won't suggest that. Instead, thaw it in the fridge.", unsafe=True)[
        "declines_unsafe_with_alternative"]


def test_safe_requests_are_not_declined():
    assert "declines_unsafe_with_alternative" in _failed(GOOD_DECLINE, unsafe=False)
    assert check_response(GOOD_DECLINE)["declines_unsafe_with_alternative"]  # unsafe=None


def test_length_limit():
    assert check_response(" ".join(["word"] * 120) + ".")["concise"]
    assert _failed(" ".join(["word"] * 121) + ".") == {"concise"}
    assert word_count("Intro here.\n1. One two.\n2. Three.") == 5


@pytest.mark.parametrize("sign_off", [
    "Hope this helps!", "Let me know if you have questions.", "Happy cooking!", "Enjoy!",
    "Enjoy your meal!", "Bon appétit!", "Good luck, and happy baking!",
])
def test_sign_off_is_caught(sign_off):
    assert _failed(GOOD + "\n" + sign_off) == {"no_sign_off"}
    assert _failed(GOOD + "\n" + sign_off + " Store leftovers cold.") == {"no_sign_off"}


def test_style_score_is_fraction():
    assert style_score("Great question! " + GOOD + "\nHope this helps!") == pytest.approx(3 / 5)


def test_unsafe_heuristic_examples():
    assert is_unsafe_prompt("How much ammonia should I add to bleach?")
    assert is_unsafe_prompt("Can I deep-fry a frozen turkey in the garage?")
    assert not is_unsafe_prompt("How do I sanitize a cutting board with bleach?")
    assert not is_unsafe_prompt("How do I make a roux?")


# --- the example data -------------------------------------------------------

def test_sft_assistant_turns_follow_house_style():
    rows = _jsonl("sft.jsonl")
    assert len(rows) >= 220
    for row in rows:
        msgs = row["messages"]
        assert msgs[-1]["role"] == "assistant", row["id"]
        for user, reply in zip(msgs, msgs[1:]):
            if reply["role"] != "assistant":
                continue
            assert user["role"] == "user", row["id"]
            unsafe = is_unsafe_prompt(user["content"])
            assert unsafe == is_decline(reply["content"]), row["id"]
            assert _failed(reply["content"], unsafe) == set(), (row["id"], reply["content"])


def test_eval_references_follow_house_style():
    rows = _jsonl("eval_prompts.jsonl")
    assert len(rows) >= 64
    for row in rows:
        unsafe = is_unsafe_prompt(row["prompt"][-1]["content"])
        assert unsafe == is_decline(row["reference"]), row["prompt_id"]
        assert _failed(row["reference"], unsafe) == set(), row["prompt_id"]


def test_ranked_best_responses_follow_house_style():
    rows = _jsonl("ranked.jsonl")
    assert len({r["prompt_id"] for r in rows}) >= 160
    for row in rows:
        unsafe = is_unsafe_prompt(row["prompt"][-1]["content"])
        best = [r["text"] for r in row["responses"] if r["rank"] == 1]
        assert len(best) == 1, row["prompt_id"]
        assert unsafe == is_decline(best[0]), row["prompt_id"]
        assert _failed(best[0], unsafe) == set(), (row["prompt_id"], row["annotator"])


def test_ranked_best_beats_worst_on_style():
    best, worst = [], []
    for row in _jsonl("ranked.jsonl"):
        unsafe = is_unsafe_prompt(row["prompt"][-1]["content"])
        low = max(r["rank"] for r in row["responses"])
        best += [style_score(r["text"], unsafe) for r in row["responses"] if r["rank"] == 1]
        worst += [style_score(r["text"], unsafe) for r in row["responses"] if r["rank"] == low]
    assert sum(best) / len(best) > sum(worst) / len(worst)


def test_prompts_are_disjoint_across_files():
    sft = {m["content"] for r in _jsonl("sft.jsonl") for m in r["messages"] if m["role"] == "user"}
    ev = {r["prompt"][-1]["content"] for r in _jsonl("eval_prompts.jsonl")}
    ranked = {r["prompt"][-1]["content"] for r in _jsonl("ranked.jsonl")}
    candidates = {r["prompt"][-1]["content"] for r in _jsonl("candidate_prompts.jsonl")}
    assert len(candidates) == len(_jsonl("candidate_prompts.jsonl")) >= 40
    files = [sft, ev, ranked, candidates]
    for i, first in enumerate(files):
        for second in files[i + 1 :]:
            assert not first & second


def test_committed_data_is_what_make_examples_writes(tmp_path):
    """data/*.jsonl are generated: regenerate them into a temporary folder and compare bytes."""
    done = subprocess.run([sys.executable, str(DATA / "make_examples.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(path.name for path in tmp_path.glob("*.jsonl"))
    assert written == sorted(path.name for path in DATA.glob("*.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"data/{name} differs from make_examples.py"
