"""Blind A/B test of the compare stage: the Argilla side and the human verdict, in one place.

A finished compare run (samples.jsonl) becomes pairs: sample j of the aligned model
meets sample j of the baseline on the same prompt, exactly the responses the reward
model scored (`ab_items`; identical pairs are left out). Each pair is one Argilla
record showing the conversation and the two responses as A and B, sides randomised
per record (`ab_sides`, seeded by the pair id) and kept in hidden metadata; record
ids are opaque hashes (`pair_id`), so nothing an annotator sees names a model
(`create_ab_dataset`, `push_ab_pairs`). The local mapping (which prompt, sample and
models a record holds) is saved as ab_pairs.jsonl.

Submitted answers are decoded back to model names (`pull_ab_answers`) and become
the human win rate of the aligned model, Wilson interval and ties apart as for the
reward model, with how often the reward model agreed (`human_comparison`).

Runs in the project venv with the `argilla` 2.8 SDK, through `align.argilla_io`
(connection, workspaces, bulk upserts, raw record pages).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from align import argilla_io
from align.errors import AlignError
from align.evaluation import prompt_win_rate

AB_PAIRS = "ab_pairs.jsonl"  # in runs/<run>/compare/: the local mapping of the pushed records
HUMAN_ANSWERS = "human_answers.jsonl"  # in runs/<run>/compare/: the pulled answers
PREFERENCE = "preference"
AB_LABELS = {"A": "Response A is better", "B": "Response B is better", "tie": "Tie: equally good or bad"}
DEFAULT_AB_GUIDELINES = """\
Two assistant replies, A and B, to the same conversation. Which one is better?
Choose **tie** when neither is clearly better. Sides are assigned at random per record.
"""


# ----------------------------------------------------------------------------- pairs and the human verdict


def pair_id(run: str, prompt_id: str, sample: int, responses: dict[str, str]) -> str:
    """Opaque record id: the id an annotator might see must not reveal which model is which.

    It hashes the two responses too: after a new `make compare`, pushing again creates new
    records instead of attaching earlier answers to different texts (Argilla keeps the
    answers of a record that is upserted)."""
    parts = [run, prompt_id, str(sample)] + [f"{model}={text}" for model, text in sorted(responses.items())]
    return "ab-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ab_items(run: str, rows: list[dict], aligned: str, baseline: str, samples_per_prompt: int) -> tuple[list[dict], list[dict], int]:
    """(items for `push_ab_pairs`, local mapping rows, pairs left out) from the compare run's samples.

    Sample j of the aligned model meets sample j of the baseline on the same prompt:
    exactly the responses the reward model scored. Pairs whose two responses are
    identical are left out (nothing to judge; the reward model counts them as ties)."""
    by_key = {(row["model"], row["prompt_id"], row["sample"]): row for row in rows}
    items, mapping, identical = [], [], 0
    for row in rows:
        if row["model"] != baseline or row["sample"] >= samples_per_prompt:
            continue
        other = by_key.get((aligned, row["prompt_id"], row["sample"]))
        if other is None:
            raise ValueError(f"{aligned} has no sample {row['sample']} for prompt {row['prompt_id']}")
        if other["text"] == row["text"]:
            identical += 1
            continue
        responses = {aligned: other["text"], baseline: row["text"]}
        pid = pair_id(run, row["prompt_id"], row["sample"], responses)
        items.append({"pair_id": pid, "prompt": row["prompt"], "responses": responses})
        mapping.append({"pair_id": pid, "prompt_id": row["prompt_id"], "sample": row["sample"], "aligned": aligned,
                        "baseline": baseline, "reward": {aligned: other["reward"], baseline: row["reward"]}})
    return items, mapping, identical


def human_comparison(answers: list[dict], mapping: list[dict], aligned: str, baseline: str, confidence: float = 0.95) -> dict | None:
    """Human win rate of `aligned` over `baseline` from decoded A/B answers (`pull_ab_answers` rows).

    Per pair, each annotator votes +1 (aligned better), -1 (baseline better) or 0 (tie);
    the pair goes to the side with the higher mean vote, a tie when the mean is 0.
    Win rate = pairs won / pairs decided, Wilson interval, ties apart (as for the
    reward model). Also: how often the reward model picked the same side as the
    humans on the pairs they decided."""
    pairs = {m["pair_id"]: m for m in mapping if m["aligned"] == aligned and m["baseline"] == baseline}
    votes: dict[str, list[int]] = {}
    annotators = set()
    for answer in answers:
        if answer["pair_id"] not in pairs:
            continue
        if set(answer["models"].values()) != {aligned, baseline}:
            raise ValueError(f"pair {answer['pair_id']}: answer names models {answer['models']}, "
                             f"the local mapping says {aligned} vs {baseline}")
        vote = 1 if answer["winner"] == aligned else -1 if answer["winner"] == baseline else 0
        votes.setdefault(answer["pair_id"], []).append(vote)
        annotators.add(answer["annotator"])
    if not votes:
        return None
    pair_votes = np.array([np.mean(v) for v in votes.values()], dtype=np.float64)
    result = prompt_win_rate(pair_votes, np.zeros_like(pair_votes), 0.0, confidence)
    agree = decided = 0
    for pid, vote in zip(votes, pair_votes):
        if vote == 0:
            continue
        rewards = pairs[pid]["reward"]
        margin = rewards[aligned] - rewards[baseline]
        decided += 1
        agree += int(np.sign(margin) == np.sign(vote))
    result.update(pairs_answered=len(votes), pairs_pushed=len(pairs), answers=sum(len(v) for v in votes.values()),
                  annotators=sorted(annotators), reward_model_agreement=agree / decided if decided else float("nan"),
                  reward_model_agreement_pairs=decided)
    return result


# ----------------------------------------------------------------------------- Argilla


def ab_sides(pair_id: str, models: Sequence[str]) -> tuple[str, str]:
    """Deterministic random assignment of two models to sides (A, B) for one record."""
    a, b = sorted(models)
    return (a, b) if argilla_io.seeded_rng(f"ab:{pair_id}").random() < 0.5 else (b, a)


def create_ab_dataset(
    client, name: str, workspace: str, guidelines: str | None = None, min_submitted: int = 1, comment: bool = True
):
    """A blind A/B dataset: fields prompt, response_a, response_b; LabelQuestion `preference` (A / B / tie)."""
    import argilla as rg

    ws = argilla_io.ensure_workspace(client, workspace)
    existing = argilla_io.quiet_lookup(client.datasets, name=name, workspace=ws.name)
    if existing is not None:
        if existing.settings.questions[PREFERENCE] is None:
            raise AlignError(f"Argilla dataset {name!r} exists and is no A/B dataset: choose another name")
        return existing
    questions: list = [
        rg.LabelQuestion(name=PREFERENCE, labels=AB_LABELS, title="Which response is better?", required=True,
                         client=client)
    ]
    if comment:
        questions.append(rg.TextQuestion(name=argilla_io.COMMENT, title="Comment (optional)", required=False, client=client))
    hidden = dict(visible_for_annotators=False, client=client)
    settings = rg.Settings(
        fields=[
            argilla_io.conversation_field(client),
            rg.TextField(name="response_a", title="Response A", use_markdown=True, client=client),
            rg.TextField(name="response_b", title="Response B", use_markdown=True, client=client),
        ],
        questions=questions,
        metadata=[
            rg.TermsMetadataProperty(name="pair_id", title="Pair id", **hidden),
            rg.TermsMetadataProperty(name="model_a", title="Model on side A", **hidden),
            rg.TermsMetadataProperty(name="model_b", title="Model on side B", **hidden),
        ],
        guidelines=guidelines or DEFAULT_AB_GUIDELINES,
        allow_extra_metadata=True,
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
    )
    return rg.Dataset(name=name, workspace=ws, settings=settings, client=client).create()


def push_ab_pairs(dataset, items: Iterable[dict]) -> list[str]:
    """Upsert one record per pair; item: {"pair_id", "prompt": [messages],
    "responses": {model_name: text, other_model_name: text}, "metadata": {...}}."""
    import argilla as rg

    records, seen = [], set()
    for i, item in enumerate(items):
        pid = item.get("pair_id")
        if not isinstance(pid, str) or not pid or pid in seen:
            raise AlignError(f"item {i}: pair_id must be a unique non-empty string, got {pid!r}")
        seen.add(pid)
        responses = item.get("responses")
        if not isinstance(responses, dict) or len(responses) != 2:
            raise AlignError(f"item {i} ({pid}): responses must map exactly two model names to texts")
        model_a, model_b = ab_sides(pid, list(responses))
        meta = dict(item.get("metadata") or {})
        meta.update(pair_id=pid, model_a=model_a, model_b=model_b, prompt_messages=item["prompt"])
        fields = {
            "prompt": argilla_io.conversation_value(dataset, item["prompt"]),
            "response_a": responses[model_a],
            "response_b": responses[model_b],
        }
        records.append(rg.Record(id=pid, fields=fields, metadata=meta, _dataset=dataset))
    if not records:
        return []
    return argilla_io.upsert_records(dataset._client, dataset, records)  # no public accessor for the client


def pull_ab_answers(client, dataset_name: str, workspace: str) -> argilla_io.Pulled:
    """Submitted A/B answers decoded to model names, one row per annotator per record.

    Row: {"pair_id", "prompt", "models": {"A": name, "B": name}, "winner": model name | "tie",
    "comment": str | None, "annotator", "provenance": {...as in pull_rankings}}.
    """
    dataset = argilla_io.find_dataset(client, dataset_name, workspace)
    users = argilla_io.usernames_by_id(client)
    rows, problems = [], []
    for rec in argilla_io.iter_raw_records(client, dataset):
        record_id = rec.get("external_id") or rec["id"]
        meta = rec.get("metadata") or {}
        for resp in rec.get("responses") or []:
            if resp.get("status") != "submitted":
                continue
            annotator = users.get(str(resp.get("user_id")), str(resp.get("user_id")))
            values = resp.get("values") or {}
            label = (values.get(PREFERENCE) or {}).get("value")
            if label not in AB_LABELS or not meta.get("model_a") or not meta.get("model_b"):
                problems.append(
                    {"record_id": record_id, "annotator": annotator, "problem": f"answer {label!r} or side metadata invalid"}
                )
                continue
            sides = {"A": meta["model_a"], "B": meta["model_b"]}
            rows.append(
                {
                    "pair_id": meta.get("pair_id", record_id),
                    "prompt": meta.get("prompt_messages"),
                    "models": sides,
                    "winner": "tie" if label == "tie" else sides[label],
                    "comment": (values.get(argilla_io.COMMENT) or {}).get("value"),
                    "annotator": annotator,
                    "provenance": argilla_io.provenance(dataset, record_id, resp),
                }
            )
    return argilla_io.Pulled(rows, problems)
