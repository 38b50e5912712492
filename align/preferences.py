"""Ranked responses -> preference pairs: checks, annotator aggregation, agreement, split.

Input: records in the ranked format (`align.data.load_ranked`, several files or an
Argilla pull concatenated), one record per (prompt, annotator):

    {"prompt_id", "prompt": [messages], "responses": [{"text", "rank"}], "annotator", "source": "file:line"}

Rules (this docstring is the reference; the reward report quotes the chosen options):

- **Ranks**: 1 = best; only their order matters. A rank must lie in 1..k for k
  responses (gaps are fine: both tie conventions, 1,1,2 and 1,1,3, are accepted).
- **Bad rankings** (reported with file:line, then skipped or refused by config):
  fewer than two responses; a rank above k; all ranks equal (no preference); the
  same response text twice with different ranks; a record whose set of
  responses differs from the one other annotators of that prompt ranked
  ("missing response"); the same annotator ranking a prompt twice differently;
  one prompt_id with two different prompts.
- **Duplicates dropped** (counted, not an error): the same response text twice
  with the same rank inside a record; the same (prompt_id, annotator) ranking
  repeated identically (e.g. one file given twice); identical pairs from two
  prompt_ids that carry the same prompt.
- **Several annotators** of one prompt are aggregated by `mean_rank` (default:
  each response's mean rank; a pair for every two responses whose mean ranks
  differ, margin = the difference) or `majority` (per pair of responses, the
  side more annotators preferred wins; margin = (votes for - votes against) /
  annotators; equal votes are a tie).
- **Ties** give no pair with `ties="drop"`. With `ties="soft"` a tie gives the
  pair in both orders with margin 0 and `tie: true`: under the Bradley-Terry loss
  the two halves pull the scores together, i.e. a soft label of 0.5 (TRL's
  RewardTrainer has no soft-label input; this is how to express one with it).
- **Agreement** (prompts with two or more annotators): for every pair of
  responses and every two annotators who ranked both, do they order them the
  same way (better / worse / tie)? The rate over all such comparisons is
  reported, with the number of annotators per prompt.
- **Split by prompt**, never by pair: prompts are ordered by a seeded hash of
  their content and the first `heldout_fraction` of them are held out, so all
  pairs of a prompt (and of any other prompt_id with the same text) land on one
  side. Order of the input does not matter; adding prompts rarely moves others.

A pair: {"prompt_id", "prompt": messages, "chosen": text, "rejected": text,
"margin": float, "tie": bool}. Everything here is deterministic and pure.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal, get_args

from align.errors import ConfigError, DataError

TieMode = Literal["drop", "soft"]
Aggregation = Literal["mean_rank", "majority"]
BadRankingPolicy = Literal["skip", "refuse"]
TIE_MODES, AGGREGATIONS, BAD_RANKING_POLICIES = get_args(TieMode), get_args(Aggregation), get_args(BadRankingPolicy)


@dataclass
class BadRanking:
    source: str  # "file:line"
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.problem}"


@dataclass
class PairReport:
    """What happened to the rankings on their way to pairs (for the stage report and manifest)."""

    records: int = 0
    records_used: int = 0
    prompts: int = 0
    pairs: int = 0
    tie_pairs: int = 0
    ties_dropped: int = 0
    duplicates_dropped: int = 0
    bad: list[BadRanking] = field(default_factory=list)
    annotators: int = 0
    annotators_per_prompt: dict[int, int] = field(default_factory=dict)  # annotators -> prompts
    agreement_rate: float | None = None  # None: no prompt had two annotators
    agreement_comparisons: int = 0

    def as_metrics(self) -> dict:
        return {
            "ranked_records": self.records,
            "ranked_records_used": self.records_used,
            "prompts": self.prompts,
            "pairs": self.pairs,
            "tie_pairs": self.tie_pairs,
            "ties_dropped": self.ties_dropped,
            "duplicates_dropped": self.duplicates_dropped,
            "bad_rankings": len(self.bad),
            "annotators": self.annotators,
            "annotators_per_prompt": {str(k): v for k, v in sorted(self.annotators_per_prompt.items())},
            "annotator_agreement": self.agreement_rate,
            "annotator_agreement_comparisons": self.agreement_comparisons,
        }


def prompt_key(prompt: list[dict]) -> str:
    """A stable identity for a prompt's content (used for dedup and the split)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def train_prompts(records: list[dict], heldout: list[dict], sources: list[str]) -> list[list[dict]]:
    """The distinct prompts of ranked `records`, in first-seen order, minus any that are also held
    out (`heldout`: prompt records): what the on-policy stages sample. `sources` name the files
    for the error when nothing is left."""
    excluded = {prompt_key(record["prompt"]) for record in heldout}
    prompts: dict[str, list[dict]] = {}
    for record in records:
        if "problem" in record:  # a malformed imported pair (align.data.broken_pair)
            continue
        key = prompt_key(record["prompt"])
        if key not in excluded:
            prompts.setdefault(key, record["prompt"])
    if not prompts:
        raise ConfigError(f"{', '.join(sources)}: no train prompts left after removing held-out ones")
    return list(prompts.values())


def check_ranking(record: dict) -> tuple[list[dict], int, list[BadRanking]]:
    """Semantic checks on one record: (responses with in-record duplicates removed, duplicates dropped, problems)."""
    source, responses = record.get("source", "?"), record["responses"]
    if "problem" in record:  # a malformed imported pair (align.data.broken_pair)
        return [], 0, [BadRanking(source, record["problem"]["field"], record["problem"]["problem"])]
    k = len(responses)
    problems: list[BadRanking] = []
    for index, response in enumerate(responses):
        if response["rank"] > k:
            problem = f"rank {response['rank']} is out of range: {k} responses, ranks run 1..{k}"
            problems.append(BadRanking(source, f"responses[{index}].rank", problem))
    kept: dict[str, dict] = {}
    duplicates = 0
    for index, response in enumerate(responses):
        first = kept.get(response["text"])
        if first is None:
            kept[response["text"]] = response
        elif first["rank"] == response["rank"]:
            duplicates += 1
        else:
            problem = f"same text as an earlier response but rank {response['rank']} vs {first['rank']}"
            problems.append(BadRanking(source, f"responses[{index}].text", problem))
    unique = list(kept.values())
    if len(unique) < 2:
        problems.append(BadRanking(source, "responses", f"{len(unique)} distinct response(s): nothing to compare"))
    elif len({r["rank"] for r in unique}) == 1:
        problems.append(BadRanking(source, "responses", f"all {len(unique)} ranks are equal: no preference"))
    return unique, duplicates, problems


def _preference(rank_a: float, rank_b: float) -> int:
    """+1 when a is better (lower rank), -1 when b is, 0 for a tie."""
    return (rank_a < rank_b) - (rank_a > rank_b)


def annotator_agreement(rankings: list[dict[str, int]]) -> tuple[int, int]:
    """(agreeing, compared) over every response pair and every two annotators who ranked both.

    `rankings`: one {text: rank} per annotator of a single prompt."""
    agree = compared = 0
    texts = sorted({text for ranking in rankings for text in ranking})
    for a, b in itertools.combinations(texts, 2):
        votes = [_preference(r[a], r[b]) for r in rankings if a in r and b in r]
        for first, second in itertools.combinations(votes, 2):
            compared += 1
            agree += first == second
    return agree, compared


def _aggregate(rankings: list[dict[str, int]], order: list[str], aggregation: str):
    """Yield (better, worse, margin, is_tie) for every two responses of one prompt."""
    if aggregation == "mean_rank":
        mean = {text: sum(r[text] for r in rankings) / len(rankings) for text in order}
        for a, b in itertools.combinations(order, 2):
            if mean[a] == mean[b]:
                yield a, b, 0.0, True
            elif mean[a] < mean[b]:
                yield a, b, mean[b] - mean[a], False
            else:
                yield b, a, mean[a] - mean[b], False
    else:  # majority
        for a, b in itertools.combinations(order, 2):
            votes = Counter(_preference(r[a], r[b]) for r in rankings)
            lead = (votes[1] - votes[-1]) / len(rankings)
            if lead == 0:
                yield a, b, 0.0, True
            elif lead > 0:
                yield a, b, lead, False
            else:
                yield b, a, -lead, False


def check_options(ties: str, aggregation: str, bad_rankings: str) -> None:
    from align.errors import ConfigError

    for key, value, allowed in (("ties", ties, TIE_MODES), ("aggregation", aggregation, AGGREGATIONS),
                                ("bad_rankings", bad_rankings, BAD_RANKING_POLICIES)):
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def _refuse(bad: list[BadRanking], hint: str = "fix or remove the record, or set bad_rankings: skip to train without it") -> None:
    first = bad[0]
    path, _, line = first.source.rpartition(":")
    more = f"; {len(bad) - 1} more bad ranking(s) after this one" if len(bad) > 1 else ""
    raise DataError(path or first.source, int(line) if line.isdigit() else None, first.field, first.problem, hint + more)


def require_pairs(pairs: list[dict], report: PairReport, sources: list[str]) -> None:
    """Refuse rankings that gave no pair at all, before any model loads: name the first bad ranking
    (file:line: field) when bad ones were skipped, else the sources."""
    if pairs:
        return
    if report.bad:
        _refuse(report.bad, "no ranking is usable, so there is nothing to train on; fix the rankings")
    raise ConfigError(f"{', '.join(sources)}: no preference pairs in {report.records} rankings "
                      f"({report.ties_dropped} tied pairs dropped by ties: drop); rank the responses apart or set ties: soft")


def ranked_to_pairs(records: list[dict], ties: str = "drop", aggregation: str = "mean_rank",
                    bad_rankings: str = "skip") -> tuple[list[dict], PairReport]:
    """Turn ranked records into preference pairs (rules in the module docstring).

    `bad_rankings="refuse"` raises `DataError` naming the first bad record's file:line;
    `"skip"` leaves bad records out and lists them in the report."""
    check_options(ties, aggregation, bad_rankings)
    report = PairReport(records=len(records))

    # 1. Per-record checks; group by prompt_id, one ranking per annotator.
    groups: dict[str, dict] = {}
    for record in records:
        unique, duplicates, problems = check_ranking(record)
        report.duplicates_dropped += duplicates
        group = groups.setdefault(record["prompt_id"], {"prompt": record["prompt"], "records": {}, "order": []})
        if not problems and record["prompt"] != group["prompt"]:
            problem = f"prompt_id {record['prompt_id']!r} was used earlier for a different prompt"
            problems.append(BadRanking(record.get("source", "?"), "prompt", problem))
        ranking = {r["text"]: r["rank"] for r in unique}
        previous = group["records"].get(record["annotator"])
        if not problems and previous is not None:
            if previous["ranking"] == ranking:
                report.duplicates_dropped += 1
                continue
            problems.append(BadRanking(record.get("source", "?"), "annotator",
                                       f"{record['annotator']!r} already ranked {record['prompt_id']!r} differently "
                                       f"at {previous['source']}"))
        if problems:
            report.bad.extend(problems)
            continue
        group["records"][record["annotator"]] = {"ranking": ranking, "source": record.get("source", "?"),
                                                 "margin": record.get("margin")}
        for text in ranking:
            if text not in group["order"]:
                group["order"].append(text)

    # 2. All annotators of a prompt must rank the same responses ("missing response").
    for prompt_id, group in groups.items():
        annotated = group["records"]
        if len(annotated) < 2:
            continue
        sets = Counter(frozenset(entry["ranking"]) for entry in annotated.values())
        common = max(sets, key=lambda s: (sets[s], -list(sets).index(s)))  # most annotators; first seen on a tie
        for annotator, entry in list(annotated.items()):
            if frozenset(entry["ranking"]) != common:
                missing, extra = common - set(entry["ranking"]), set(entry["ranking"]) - common
                detail = f"{len(missing)} response(s) missing" if missing else ""
                detail += (", " if missing and extra else "") + (f"{len(extra)} extra response(s)" if extra else "")
                problem = (f"{detail} compared with the {sets[common]} other annotator(s) of {prompt_id!r}; "
                           "all annotators must rank the same responses")
                report.bad.append(BadRanking(entry["source"], "responses", problem))
                del annotated[annotator]
        group["order"] = [text for text in group["order"] if text in common]

    if report.bad and bad_rankings == "refuse":
        _refuse(report.bad)

    # 3. Aggregate, agreement, pairs.
    pairs: list[dict] = []
    seen_pairs: set[tuple[str, str, str]] = set()
    agree = compared = 0
    annotators: set[str] = set()
    per_prompt: Counter = Counter()
    for prompt_id, group in groups.items():
        rankings = [entry["ranking"] for entry in group["records"].values()]
        if not rankings:
            continue
        report.records_used += len(rankings)
        report.prompts += 1
        annotators.update(group["records"])
        per_prompt[len(rankings)] += 1
        if len(rankings) > 1:
            a, c = annotator_agreement(rankings)
            agree, compared = agree + a, compared + c
        key = prompt_key(group["prompt"])
        # a dataset's own margin (a pair imported with one, align.data) replaces the rank distance
        (given_margin,) = [entry["margin"] for entry in group["records"].values()] if len(rankings) == 1 else [None]
        for better, worse, margin, is_tie in _aggregate(rankings, group["order"], aggregation):
            if given_margin is not None and not is_tie:
                margin = given_margin
            if is_tie and ties == "drop":
                report.ties_dropped += 1
                continue
            orders = [(better, worse), (worse, better)] if is_tie else [(better, worse)]
            for chosen, rejected in orders:
                identity = (key, chosen, rejected)
                if identity in seen_pairs:
                    report.duplicates_dropped += 1
                    continue
                seen_pairs.add(identity)
                pairs.append({"prompt_id": prompt_id, "prompt": group["prompt"], "chosen": chosen,
                              "rejected": rejected, "margin": float(margin), "tie": is_tie})
                report.tie_pairs += is_tie
    report.pairs = len(pairs)
    report.annotators = len(annotators)
    report.annotators_per_prompt = dict(per_prompt)
    report.agreement_comparisons = compared
    report.agreement_rate = agree / compared if compared else None
    return pairs, report


def split_by_prompt(pairs: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): every pair of one prompt lands on the same side.

    Prompts are ordered by sha256(seed, prompt content) and the first
    round(fraction * prompts) are held out (at least one when the fraction is
    positive and there are two or more prompts)."""
    if not 0 <= heldout_fraction < 1:
        from align.errors import ConfigError

        raise ConfigError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")
    keys = sorted({prompt_key(pair["prompt"]) for pair in pairs},
                  key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    count = round(heldout_fraction * len(keys))
    if heldout_fraction > 0 and len(keys) >= 2:
        count = min(max(count, 1), len(keys) - 1)
    heldout_keys = set(keys[:count])
    train = [pair for pair in pairs if prompt_key(pair["prompt"]) not in heldout_keys]
    heldout = [pair for pair in pairs if prompt_key(pair["prompt"]) in heldout_keys]
    return train, heldout


def pairs_by_prompt(pairs: list[dict]) -> dict[str, list[dict]]:
    """Group pairs by prompt content (e.g. to count prompts on each side of a split)."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for pair in pairs:
        grouped[prompt_key(pair["prompt"])].append(pair)
    return dict(grouped)
