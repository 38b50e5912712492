"""Aligned vs SFT: the numbers, the pictures and the report of the compare stage.

`stages/compare.py` generates and scores; everything it reports is computed and
written here, so `stages/compare_pull.py` can add the human verdict and rebuild
the same report from `report.json` and `samples.jsonl`.

Unit of analysis: the PROMPT. Every model answers every held-out prompt with the
same decoding settings and seed (`samples_per_prompt` samples each). A prompt's
reward is the mean reward of its samples; intervals bootstrap over prompts and
the reward-model win rate counts one win, tie or loss per prompt. Samples of one
prompt are not independent, so treating them as separate items would make the
intervals too narrow.

Definitions (each number in the report is one of these):
- reward difference: mean over prompts of (aligned prompt reward - baseline
  prompt reward), with a percentile bootstrap interval (prompts resampled with
  replacement; `align.evaluation.bootstrap_mean_ci`).
- win rate: prompts where aligned's reward exceeds baseline's by more than
  `tie_tolerance`, over prompts decided either way; ties (including identical
  responses, which score exactly the same) are counted apart; Wilson interval
  (`align.evaluation.win_rate`).
- KL(aligned || baseline): mean over aligned samples y of
  sum_t [log p_aligned(y_t | x, y_<t) - log p_baseline(y_t | x, y_<t)], both terms
  from a forward pass under the same settings (`align.logprobs`). Unbiased only
  for samples drawn from the aligned model itself (temperature 1, top_p 1),
  which is why the stage draws them at `kl_temperature` (default 1.0).
- length: response tokens without the end-of-turn token; relative change of the
  mean.
- style: pass rate of each house-style rule of the example project
  (`align.style.check_response`), and the mean style score (share of rules passed).

Hand-written glue: no library builds this kind of report.
"""

import hashlib
import html
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.evaluation import bootstrap_mean_ci, length_correlation, win_rate
from align.files import atomic_path, atomic_write_text, json_safe, read_jsonl_records

REPORT_MD, REPORT_HTML, REPORT_JSON, SAMPLES = "report.md", "report.html", "report.json", "samples.jsonl"
AB_PAIRS = "ab_pairs.jsonl"
PLOTS = {
    "reward_distributions": "reward_distributions.png",
    "win_rate": "win_rate.png",
    "length_vs_reward": "length_vs_reward.png",
    "style": "style_pass_rates.png",
}
VERDICTS = {"better": "aligned is better", "worse": "aligned is WORSE", "inconclusive": "inconclusive"}


# ----------------------------------------------------------------------------- configuration
# The compare, compare-to-argilla and compare-pull stages all read configs/compare.yaml
# through these two dataclasses (stages never import each other).


@dataclass
class CompareArgs:
    run: str = field(default="default", metadata={"help": "run name: reads runs/<run>/..., writes runs/<run>/compare"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "stage folders to compare (runs/<run>/<stage>), the first is the baseline; empty = baseline_stage "
                "and the newest of aligned_stages of this run"})  # fmt: skip
    baseline_stage: str = field(default="sft", metadata={"help": "baseline stage when checkpoints is empty"})
    aligned_stages: list[str] = field(default_factory=lambda: ["dpo"], metadata={
        "help": "the newest finished stage among these is the aligned model (when checkpoints is empty)"})  # fmt: skip
    prompts_file: str = field(default="data/eval_prompts.jsonl", metadata={"help": "held-out prompts JSONL"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    reward_checkpoint: str | None = field(default=None, metadata={"help": "reward stage folder (default runs/<run>/reward)"})
    reward_gate_policy: str = field(default="warn", metadata={"help": "warn | refuse when the reward model failed its gate"})
    score_batch_size: int = field(default=16, metadata={"help": "reward scoring batch"})
    # decoding: identical for every model
    backend: str = field(default="auto", metadata={"help": "generation backend: auto | vllm | hf | openai"})
    dtype: str = field(default="auto", metadata={"help": "generation dtype: auto | bf16 | fp32"})
    server_url: str | None = field(default=None, metadata={"help": "vLLM server for backend openai"})
    seed: int = field(default=1234, metadata={"help": "sampling seed, the same for every model"})
    samples_per_prompt: int = field(default=2, metadata={"help": "responses per prompt and model"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=160, metadata={"help": "response length limit"})
    # KL
    kl_temperature: float = field(default=1.0, metadata={"help": "temperature of the aligned samples the KL is estimated on"})
    kl_samples_per_prompt: int = field(default=1, metadata={"help": "aligned samples per prompt for the KL"})
    kl_estimator: str = field(default="k3", metadata={"help": "k3 (>= 0, low variance) | k1 (log-ratio)"})
    kl_dtype: str = field(default="float32", metadata={"help": "dtype of the KL forward passes"})
    kl_batch_size: int = field(default=8, metadata={"help": "KL forward-pass batch"})
    # statistics and report
    bootstrap_resamples: int = field(default=2000, metadata={"help": "bootstrap resamples for intervals"})
    confidence: float = field(default=0.95, metadata={"help": "interval coverage"})
    tie_tolerance: float = field(default=0.0, metadata={"help": "prompt rewards closer than this are a tie"})
    length_warn: float = field(default=0.2, metadata={"help": "warn when responses grow by more than this fraction"})
    style_warn: float = field(default=0.1, metadata={"help": "warn when a style rule's pass rate drops by more than this"})
    example_rows: int = field(default=6, metadata={"help": "prompts in the examples table"})


@dataclass
class CompareArgillaArgs:
    """Keys of configs/compare.yaml used by compare-to-argilla / compare-pull."""

    argilla_dataset: str | None = field(default=None, metadata={"help": "A/B dataset name (default compare-<run>)"})
    argilla_workspace: str = field(default="align", metadata={"help": "Argilla workspace"})
    argilla_samples_per_prompt: int = field(default=1, metadata={"help": "A/B pairs per prompt (sample 0, 1, ...)"})
    argilla_min_submitted: int = field(default=1, metadata={"help": "answers wanted per pair"})


# ----------------------------------------------------------------------------- pure math


def prompt_means(samples_per_prompt: list[list[float]]) -> np.ndarray:
    """One number per prompt: the mean over its samples."""
    if not samples_per_prompt or any(len(values) == 0 for values in samples_per_prompt):
        raise ValueError("every prompt needs at least one sample")
    return np.array([float(np.mean(values)) for values in samples_per_prompt], dtype=np.float64)


def mean_interval(values, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """{"mean", "low", "high"}: percentile bootstrap interval of the mean."""
    mean, low, high = bootstrap_mean_ci(values, resamples, seed, confidence)
    return {"mean": mean, "low": low, "high": high}


def paired_difference(aligned, baseline, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of the paired differences aligned - baseline (one pair per prompt) with its bootstrap interval.

    Paired, not two independent means: both models answered the same prompts, and
    prompt difficulty (which moves both rewards together) cancels out."""
    aligned, baseline = np.asarray(aligned, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if aligned.shape != baseline.shape or aligned.size == 0:
        raise ValueError(f"paired values must be non-empty and equally long, got {aligned.shape} and {baseline.shape}")
    interval = mean_interval(aligned - baseline, resamples, seed, confidence)
    return {"aligned": float(aligned.mean()), "baseline": float(baseline.mean()), "difference": interval["mean"],
            "low": interval["low"], "high": interval["high"], "prompts": int(aligned.size)}  # fmt: skip


def prompt_win_rate(aligned, baseline, tie_tolerance: float = 0.0, confidence: float = 0.95) -> dict:
    """Wins / ties / losses of aligned over baseline per prompt; rate = wins / (wins + losses), Wilson interval."""
    return win_rate(aligned, baseline, tie_tolerance=tie_tolerance, confidence=confidence).as_dict()


def relative_change(new: float, old: float) -> float:
    """(new - old) / |old|; NaN when old is 0."""
    return (new - old) / abs(old) if old else float("nan")


def pass_rates(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Share of responses passing each rule."""
    if not checks:
        return {}
    return {rule: float(np.mean([bool(check[rule]) for check in checks])) for rule in checks[0]}


def decide(difference: dict, wins: dict) -> str:
    """better | worse | inconclusive.

    better: the reward-difference interval lies above 0 AND the win-rate interval
    lies above 50%. worse: both below. Anything else (an interval touching the
    no-effect value, or the two measures disagreeing) is inconclusive."""
    decided = wins["wins"] + wins["losses"] > 0
    if difference["low"] > 0 and decided and wins["low"] > 0.5:
        return "better"
    if difference["high"] < 0 and decided and wins["high"] < 0.5:
        return "worse"
    return "inconclusive"


def cost_notes(length_change: float, style_change: dict[str, float], length_warn: float, style_warn: float) -> list[str]:
    """Warnings for the verdict: length hacking (mean length up more than `length_warn`, a fraction)
    and style drift (a rule's pass rate down more than `style_warn`, absolute)."""
    notes = []
    if not math.isnan(length_change) and length_change > length_warn:
        notes.append(f"responses {length_change:+.0%} longer: check for length hacking")
    drops = [f"{rule} {change:+.0%}" for rule, change in style_change.items() if change < -style_warn]
    if drops:
        notes.append("style drift: " + ", ".join(drops))
    return notes


# ----------------------------------------------------------------------------- building the results


def summarize_model(rows: list[dict], resamples: int, seed: int, confidence: float) -> dict:
    """Per-model numbers from its sample rows (all prompts, all samples)."""
    by_prompt = group_by_prompt(rows)
    rewards = prompt_means([[row["reward"] for row in group] for group in by_prompt.values()])
    tokens = [row["tokens"] for row in rows]
    checks = [row["style"] for row in rows]
    scores = [row["reward"] for row in rows]
    correlation = length_correlation(scores, tokens) if len(rows) > 1 else float("nan")
    return {
        "reward": mean_interval(rewards, resamples, seed, confidence),
        "reward_std": float(np.std(scores)),
        "tokens_mean": float(np.mean(tokens)),
        "tokens_median": float(np.median(tokens)),
        "words_mean": float(np.mean([row["words"] for row in rows])),
        "truncated_share": float(np.mean([row["finish_reason"] == "length" for row in rows])),
        "style_score": float(np.mean([row["style_score"] for row in rows])),
        "style_pass_rates": pass_rates(checks),
        "reward_length_spearman": correlation,
        "samples": len(rows),
        "prompts": len(by_prompt),
    }


def group_by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    return groups


def compare_pair(aligned: str, baseline: str, rows: dict[str, list[dict]], summaries: dict[str, dict],
                 kl_samples: dict | None, options: dict) -> dict:  # fmt: skip
    """All numbers of one aligned-vs-baseline comparison.

    kl_samples: {"estimator", "values": per-sample KL, "k1": per-sample k1 values,
    "prompt_ids": prompt of each sample, "tokens": total completion tokens}, or None."""
    resamples, seed, confidence = options["bootstrap_resamples"], options["seed"], options["confidence"]
    aligned_groups, baseline_groups = group_by_prompt(rows[aligned]), group_by_prompt(rows[baseline])
    if set(aligned_groups) != set(baseline_groups):
        raise ValueError(f"{aligned} and {baseline} answered different prompts")
    prompt_ids = list(baseline_groups)
    aligned_rewards = prompt_means([[r["reward"] for r in aligned_groups[p]] for p in prompt_ids])
    baseline_rewards = prompt_means([[r["reward"] for r in baseline_groups[p]] for p in prompt_ids])
    difference = paired_difference(aligned_rewards, baseline_rewards, resamples, seed, confidence)
    wins = prompt_win_rate(aligned_rewards, baseline_rewards, options["tie_tolerance"], confidence)

    kl = None
    if kl_samples is not None:
        kl = kl_interval(kl_samples, resamples, seed, confidence)

    a, b = summaries[aligned], summaries[baseline]
    length = relative_change(a["tokens_mean"], b["tokens_mean"])
    style = {rule: a["style_pass_rates"][rule] - b["style_pass_rates"][rule] for rule in b["style_pass_rates"]}
    notes = cost_notes(length, style, options["length_warn"], options["style_warn"])
    label = decide(difference, wins)
    comparison = {
        "aligned": aligned, "baseline": baseline, "reward_difference": difference, "win_rate": wins, "kl": kl,
        "length_change": length, "style_score_change": a["style_score"] - b["style_score"],
        "style_pass_rate_change": style, "verdict": label, "notes": notes,
    }  # fmt: skip
    comparison["verdict_line"] = verdict_line(comparison)
    return comparison


def kl_interval(kl_samples: dict, resamples: int, seed: int, confidence: float) -> dict:
    """Mean per-response KL with a bootstrap interval over prompts (a prompt's KL: mean over its samples)."""
    per_prompt: dict[str, list[float]] = {}
    for prompt_id, value in zip(kl_samples["prompt_ids"], kl_samples["values"]):
        per_prompt.setdefault(prompt_id, []).append(float(value))
    kl = mean_interval(prompt_means(list(per_prompt.values())), resamples, seed, confidence)
    values = np.asarray(kl_samples["values"], dtype=np.float64)
    kl.update(estimator=kl_samples["estimator"], samples=int(values.size),
              per_token=float(values.sum() / kl_samples["tokens"]) if kl_samples["tokens"] else float("nan"),
              k1_mean=float(np.mean(kl_samples["k1"])))  # fmt: skip
    return kl


def fmt_signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def missing(value) -> bool:
    """None (a NaN after a JSON round trip) or NaN: a number that could not be computed."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str) -> str:
    return "n/a" if missing(value) else format(value, spec)


def fmt_pct(value: float) -> str:
    return fmt(value, ".0%")


def verdict_line(comparison: dict) -> str:
    """`[compare] dpo vs sft: reward +0.42 [0.21, 0.63], win rate 68% [59%, 76%], KL 0.12 nats, length +8% -> aligned is better`"""
    d, w, kl = comparison["reward_difference"], comparison["win_rate"], comparison["kl"]
    parts = [
        f"reward {fmt_signed(d['difference'])} [{d['low']:.2f}, {d['high']:.2f}]",
        f"win rate {fmt_pct(w['rate'])} [{fmt_pct(w['low'])}, {fmt_pct(w['high'])}] ({w['ties']} ties)",
    ]
    if kl is not None:
        parts.append(f"KL {kl['mean']:.3g} nats")
    parts.append(f"length {fmt(comparison['length_change'], '+.0%')}")
    line = f"[compare] {comparison['aligned']} vs {comparison['baseline']}: " + ", ".join(parts)
    line += f" -> {VERDICTS[comparison['verdict']]}"
    if comparison["notes"]:
        line += " (" + "; ".join(comparison["notes"]) + ")"
    return line


# ----------------------------------------------------------------------------- human verdict (Argilla A/B)


def pair_id(run: str, prompt_id: str, sample: int, responses: dict[str, str]) -> str:
    """Opaque record id: the id an annotator might see must not reveal which model is which.

    It hashes the two responses too: after a new `make compare`, pushing again creates new
    records instead of attaching earlier answers to different texts (Argilla keeps the
    answers of a record that is upserted)."""
    parts = [run, prompt_id, str(sample)] + [f"{model}={text}" for model, text in sorted(responses.items())]
    return "ab-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ab_items(run: str, rows: list[dict], aligned: str, baseline: str, samples_per_prompt: int) -> tuple[list[dict], list[dict], int]:
    """(items for `argilla_io.push_ab_pairs`, local mapping rows, pairs left out) from the compare run's samples.

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
                        "baseline": baseline, "reward": {aligned: other["reward"], baseline: row["reward"]}})  # fmt: skip
    return items, mapping, identical


def human_comparison(answers: list[dict], mapping: list[dict], aligned: str, baseline: str, confidence: float = 0.95) -> dict | None:
    """Human win rate of `aligned` over `baseline` from decoded A/B answers (`argilla_io.pull_ab_answers` rows).

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
                             f"the local mapping says {aligned} vs {baseline}")  # fmt: skip
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
                  reward_model_agreement_pairs=decided)  # fmt: skip
    return result


# ----------------------------------------------------------------------------- files


def read_samples(folder: Path) -> list[dict]:
    return read_jsonl_records(folder / SAMPLES)


def write_outputs(folder: Path, results: dict, rows: list[dict]) -> list[str]:
    """report.json, PNG plots, report.md and report.html (when `markdown` is installed); atomic per file."""
    folder = Path(folder)
    results = json_safe(results)  # render what report.json holds (NaN -> null), here and in compare-pull alike
    results["plots"] = make_plots(folder, results, rows)
    plots = results["plots"]
    atomic_write_text(folder / REPORT_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    markdown_text = render_report(results, rows)
    atomic_write_text(folder / REPORT_MD, markdown_text)
    written = [REPORT_JSON, REPORT_MD, *plots.values()]
    try:
        import markdown
    except ImportError:  # HTML is a convenience; report.md is the report
        return written
    body = markdown.markdown(markdown_text, extensions=["tables"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(results['title'])}</title>"
            "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
            "vertical-align:top}th{background:#eee}img{max-width:100%}code{background:#f4f4f4}</style>"
            f"</head><body>{body}</body></html>\n")  # fmt: skip
    atomic_write_text(folder / REPORT_HTML, page)
    return [*written, REPORT_HTML]


# ----------------------------------------------------------------------------- plots


def make_plots(folder: Path, results: dict, rows: list[dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["model_order"]
    colors = {model: plt.get_cmap("tab10")(index) for index, model in enumerate(models)}
    by_model = {model: [row for row in rows if row["model"] == model] for model in models}
    subtitle = f"run {results['run']}, {results['prompts']} held-out prompts x {results['settings']['n']} samples"

    def save(fig, key):
        fig.tight_layout()
        with atomic_path(folder / PLOTS[key], suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")  # keeps legends placed below the axes
        plt.close(fig)

    # 1. reward distributions
    fig, ax = plt.subplots(figsize=(8, 4.5))
    all_rewards = [row["reward"] for row in rows]
    bins = np.linspace(min(all_rewards), max(all_rewards), 31) if max(all_rewards) > min(all_rewards) else 10
    for model in models:
        values = [row["reward"] for row in by_model[model]]
        mean = results["models"][model]["reward"]["mean"]
        ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.35, color=colors[model],
                label=f"{model} (mean {mean:+.2f}, {len(values)} responses)")  # fmt: skip
        ax.hist(values, bins=bins, histtype="step", color=colors[model], linewidth=1.5)
        ax.axvline(mean, color=colors[model], linestyle="--", linewidth=1.5)
    ax.set_xlabel("reward-model score (higher = preferred)")
    ax.set_ylabel("responses")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(f"Reward distribution per model (dashed: mean)\n{subtitle}", fontsize=10)
    ax.legend(fontsize=9)
    save(fig, "reward_distributions")

    # 2. win rate with interval (reward model, and humans when collected)
    entries = []
    for comparison in results["comparisons"]:
        name = f"{comparison['aligned']} vs {comparison['baseline']}"
        entries.append((f"{name}\nreward model", comparison["win_rate"], "tab:blue"))
        human = comparison.get("human")
        if human:
            entries.append((f"{name}\nhumans ({human['answers']} answers)", human, "tab:orange"))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.0 * len(entries)))
    for y, (label, w, color) in enumerate(entries):
        if w["wins"] + w["losses"] == 0:
            ax.text(0.5, y, "no decided pairs", ha="center", va="center")
            continue
        ax.errorbar(w["rate"], y, xerr=[[w["rate"] - w["low"]], [w["high"] - w["rate"]]], fmt="o", color=color,
                    capsize=6, markersize=8, linewidth=2)  # fmt: skip
        ax.annotate(f"{w['rate']:.0%} [{w['low']:.0%}, {w['high']:.0%}]\n{w['wins']} won / {w['losses']} lost / "
                    f"{w['ties']} ties", (w["rate"], y), textcoords="offset points", xytext=(0, 12), ha="center",
                    fontsize=8)  # fmt: skip
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1.5)
    ax.text(0.51, len(entries) - 0.45, "50% = no preference", color="grey", ha="left", va="bottom", fontsize=8)
    ax.set_yticks(range(len(entries)), [entry[0] for entry in entries], fontsize=9)
    ax.set_ylim(len(entries) - 0.4, -0.7)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("win rate of the aligned model (ties left out), 95% Wilson interval")
    unit = "per prompt" if len(entries) == len(results["comparisons"]) else "reward model per prompt, humans per A/B pair"
    ax.set_title(f"Win rate of aligned over baseline ({unit})\n{subtitle}", fontsize=10)
    save(fig, "win_rate")

    # 3. length vs reward
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for model in models:
        tokens = [row["tokens"] for row in by_model[model]]
        rewards = [row["reward"] for row in by_model[model]]
        rho = results["models"][model]["reward_length_spearman"]
        rho_text = fmt(rho, "+.2f")
        ax.scatter(tokens, rewards, s=18, alpha=0.6, color=colors[model],
                   label=f"{model} (mean {np.mean(tokens):.0f} tokens, Spearman {rho_text})")  # fmt: skip
    limit = results["settings"]["max_new_tokens"]
    ax.axvline(limit, color="grey", linestyle=":", linewidth=1.2, label=f"max_new_tokens {limit}: responses here were cut off")
    ax.set_xlim(0, limit * 1.08)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward-model score")
    ax.set_title(f"Length vs reward: a rising cloud for the aligned model hints at length hacking\n{subtitle}",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
    save(fig, "length_vs_reward")

    # 4. style pass rates per rule
    rules = list(results["models"][models[0]]["style_pass_rates"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        rates = [results["models"][model]["style_pass_rates"][rule] for rule in rules]
        positions = np.arange(len(rules)) + (index - (len(models) - 1) / 2) * width
        bars = ax.bar(positions, rates, width, color=colors[model], label=model)
        ax.bar_label(bars, labels=[f"{rate:.0%}" for rate in rates], fontsize=7, padding=1)
    ax.set_xticks(range(len(rules)), [textwrap.fill(rule.replace("_", " "), 16) for rule in rules], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_ylabel("responses passing the rule")
    ax.set_title(f"House-style checks (data/README.md) per model: a drop is style drift\n{subtitle}", fontsize=10)
    ax.legend(fontsize=9, loc="upper center", ncols=len(models))
    save(fig, "style")
    return dict(PLOTS)


# ----------------------------------------------------------------------------- report.md


def _cell(text: str, limit: int = 420) -> str:
    """A response inside a markdown table cell: escaped, newlines as <br>, long ones cut."""
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " [...]"
    text = html.escape(text, quote=False).replace("|", "&#124;")
    return text.replace("\n", "<br>") or "*(empty)*"


def _interval(entry: dict, digits: int = 2, signed: bool = False) -> str:
    value = f"{entry['mean']:+.{digits}f}" if signed else f"{entry['mean']:.{digits}f}"
    return f"{value} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def example_prompts(rows: list[dict], comparison: dict, count: int) -> list[str]:
    """Prompts for the examples table: the biggest aligned win and loss first, then evenly spread ones."""
    aligned, baseline = comparison["aligned"], comparison["baseline"]
    a, b = group_by_prompt([r for r in rows if r["model"] == aligned]), group_by_prompt([r for r in rows if r["model"] == baseline])
    margins = {pid: a[pid][0]["reward"] - b[pid][0]["reward"] for pid in b if pid in a}
    ordered = sorted(margins, key=margins.get)
    chosen = []
    if ordered:
        chosen += [ordered[-1]] + ([ordered[0]] if len(ordered) > 1 else [])
    rest = [pid for pid in b if pid not in chosen]
    step = max(1, len(rest) // max(1, count - len(chosen)))
    chosen += rest[::step]
    return chosen[:count]


def render_report(results: dict, rows: list[dict]) -> str:
    s, models = results["settings"], results["model_order"]
    lines = [f"# {results['title']}", ""]
    lines += ["**Verdict**", ""] + [f"    {c['verdict_line']}" for c in results["comparisons"]] + [""]
    lines += [
        "Rules of the verdict: **better** when the 95% interval of the reward difference lies above 0 *and* the "
        "95% interval of the win rate lies above 50%; **worse** when both lie below; otherwise **inconclusive** "
        f"(not enough evidence either way with {results['prompts']} prompts). Warnings are added when responses "
        f"grow more than {results['options']['length_warn']:.0%} longer (length hacking: a reward model that "
        f"likes long answers can be gamed) or a house-style rule's pass rate drops by more than "
        f"{results['options']['style_warn']:.0%} (style drift).",
        "",
        "## How this was measured",
        "",
        "| | |",
        "| --- | --- |",
    ]
    for model in models:
        info = results["models"][model]
        role = "baseline" if model == results["baseline"] else "aligned"
        lines.append(f"| {model} ({role}) | `{info['checkpoint']['path']}` (manifest sha256 "
                     f"`{info['checkpoint']['manifest_sha256'][:12]}`) |")  # fmt: skip
    reward = results["reward_model"]
    gate = {True: "passed", False: "**FAILED**", None: "not recorded"}[reward.get("gate_passed")]
    lines += [
        f"| reward model | `{reward['path']}` (quality gate {gate}) |",
        f"| prompts | {results['prompts']} held-out prompts from `{results['prompts_file']}` |",
        f"| decoding (every model) | {s['n']} samples per prompt, temperature {s['temperature']}, top_p {s['top_p']}, "
        f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}; backend {results['backend']} |",
        f"| KL samples | {results['kl_settings']} |",
        f"| intervals | 95% = percentile bootstrap over prompts ({results['options']['bootstrap_resamples']} "
        f"resamples) for means; Wilson score interval for win rates |",
        "",
        "Why sampled decoding: greedy decoding shows one answer per prompt and hides how varied a model's "
        "answers are, which is what alignment often changes. Sampling every model with the same temperature, "
        "prompts and seed is fair (no model gets better settings) and reproducible (rerun, same numbers). "
        "A prompt's reward is the mean over its samples; the win rate counts one win, tie or loss per prompt "
        + (f"(a tie: the two prompt rewards differ by at most {results['options']['tie_tolerance']}; "
           if results["options"]["tie_tolerance"] else "(a tie: the two prompt rewards are exactly equal; ")
        + "identical responses always tie, because each distinct response is scored once).",
        "",
        "## Per model",
        "",
        "| model | mean reward [95% CI] | mean length (tokens) | words | cut off at max_new_tokens | style score "
        "| reward-length Spearman |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in models:
        m = results["models"][model]
        rho = m["reward_length_spearman"]
        rho_text = fmt(rho, "+.2f")
        lines.append(f"| {model} | {_interval(m['reward'], signed=True)} | {m['tokens_mean']:.1f} | {m['words_mean']:.1f} "
                     f"| {m['truncated_share']:.0%} | {m['style_score']:.0%} | {rho_text} |")  # fmt: skip
    rules = list(results["models"][models[0]]["style_pass_rates"])
    lines += ["", "House-style pass rates (share of responses passing each rule of data/README.md):", "",
              "| rule | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]  # fmt: skip
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(f"{results['models'][m]['style_pass_rates'][rule]:.0%}" for m in models) + " |")

    for comparison in results["comparisons"]:
        lines += _comparison_section(results, comparison, rows)

    lines += [
        "## Plots",
        "",
        f"![reward distributions]({PLOTS['reward_distributions']})",
        "",
        "*Reward distributions*: every response's reward-model score, one colour per model; dashed lines are the "
        "means. A distribution shifted right means the reward model prefers that model's answers.",
        "",
        f"![win rate]({PLOTS['win_rate']})",
        "",
        "*Win rate*: share of prompts (ties left out) where the aligned model's answers scored higher, with its 95% "
        "interval; the dotted line at 50% is no preference. An interval entirely right of it is a real win."
        + (" Human answers from the blind A/B test are shown in orange." if any(c.get("human") for c in results["comparisons"]) else ""),
        "",
        f"![length vs reward]({PLOTS['length_vs_reward']})",
        "",
        "*Length vs reward*: one dot per response. If the aligned model's dots move right (longer) while moving up "
        "(higher reward) and the Spearman correlation is strong, the gain may come from length rather than quality.",
        "",
        f"![style pass rates]({PLOTS['style']})",
        "",
        "*House-style checks*: share of responses passing each rule. A bar that shrinks from baseline to aligned is "
        "style drift: the reward signal pulled the model away from the house style.",
        "",
        "## Files",
        "",
        f"- `{REPORT_JSON}`: every number above (and the settings), for scripts",
        f"- `{SAMPLES}`: every response with its reward, length and style checks",
        "- `manifest.json`: checkpoints, reward model and prompts consumed (with sha256), versions",
        "",
    ]
    return "\n".join(lines)


def _comparison_section(results: dict, comparison: dict, rows: list[dict]) -> list[str]:
    aligned, baseline = comparison["aligned"], comparison["baseline"]
    d, w, kl = comparison["reward_difference"], comparison["win_rate"], comparison["kl"]
    lines = [
        "",
        f"## {aligned} vs {baseline}",
        "",
        "| measure | value | how to read it |",
        "| --- | --- | --- |",
        f"| reward difference | {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | mean over prompts of "
        f"{aligned} minus {baseline} reward ({d['aligned']:+.3f} vs {d['baseline']:+.3f}); interval above 0 = better |",
        f"| reward-model win rate | {fmt_pct(w['rate'])} [{fmt_pct(w['low'])}, {fmt_pct(w['high'])}] | {w['wins']} "
        f"prompts won, {w['losses']} lost, {w['ties']} tied (ties left out of the rate; counting a tie as half a "
        f"win: {w['rate_ties_half']:.0%}) |",
    ]
    if kl is not None:
        lines.append(f"| KL({aligned} &#124;&#124; {baseline}) | {kl['mean']:.3f} nats [{kl['low']:.3f}, {kl['high']:.3f}] "
                     f"| how far {aligned} moved from {baseline}, per response ({fmt(kl['per_token'], '.2g')} nats per token, "
                     f"{kl['samples']} samples, {kl['estimator']} estimator); 0 = the same model; the price paid for the "
                     f"reward gain. The plain log-ratio (k1) gives {fmt(kl['k1_mean'], '.3f')}: noisier, and biased "
                     "upwards when the sampler runs in lower precision (bf16) than the forward passes |")  # fmt: skip
    lines += [
        f"| length change | {fmt(comparison['length_change'], '+.0%')} | mean response tokens "
        f"{results['models'][aligned]['tokens_mean']:.1f} vs {results['models'][baseline]['tokens_mean']:.1f} |",
        f"| style score change | {comparison['style_score_change']:+.0%} | share of house-style rules passed, "
        f"{aligned} minus {baseline} |",
    ]
    human = comparison.get("human")
    if human:
        lines.append(f"| **human win rate** | {fmt_pct(human['rate'])} [{fmt_pct(human['low'])}, {fmt_pct(human['high'])}] "
                     f"| blind A/B in Argilla: {human['wins']} pairs won, {human['losses']} lost, {human['ties']} tied; "
                     f"{human['answers']} answers by {len(human['annotators'])} annotator(s) on "
                     f"{human['pairs_answered']} of {human['pairs_pushed']} pairs |")  # fmt: skip
    lines += ["", f"Verdict: **{VERDICTS[comparison['verdict']]}**."]
    if comparison["notes"]:
        lines += ["", "Warnings: " + "; ".join(comparison["notes"]) + "."]
    lines += ["", "### Human verdict (blind A/B)", ""]
    if human:
        agreement = human["reward_model_agreement"]
        agreement_text = fmt_pct(agreement)
        lines += [
            f"Humans preferred {aligned} on {fmt_pct(human['rate'])} of the pairs they decided "
            f"[{fmt_pct(human['low'])}, {fmt_pct(human['high'])}] (Argilla dataset `{results.get('argilla', {}).get('dataset', '?')}`, "
            f"sides randomised per record). A pair with several answers goes to the majority; a split is a tie. "
            f"The reward model picked the same side as the humans on {agreement_text} of the "
            f"{human['reward_model_agreement_pairs']} pairs humans decided."
            + (f" {results['argilla']['identical_pairs_left_out']} pair(s) with identical responses were not pushed."
               if results.get("argilla", {}).get("identical_pairs_left_out") else ""),
        ]
    else:
        lines += ["Not collected yet. `make compare-to-argilla RUN=...` pushes blind A/B pairs of exactly these "
                  "responses to Argilla; once annotated, `make compare-pull RUN=...` adds the human win rate here."]  # fmt: skip
    count = results["options"]["example_rows"]
    lines += [
        "",
        f"### Examples ({aligned} vs {baseline})",
        "",
        "The prompt where the aligned model gained most, the one where it lost most, then prompts spread over the "
        "set; the first sample of each model, with its reward-model score.",
        "",
        f"| prompt | {baseline} | {aligned} |",
        "| --- | --- | --- |",
    ]
    by_key = {(r["model"], r["prompt_id"], r["sample"]): r for r in rows}
    for pid in example_prompts(rows, comparison, count):
        base, new = by_key[(baseline, pid, 0)], by_key[(aligned, pid, 0)]
        user = next((m["content"] for m in reversed(base["prompt"]) if m["role"] == "user"), "")
        lines.append(f"| `{pid}`<br>{_cell(user, 240)} | **{base['reward']:+.2f}**, {base['tokens']} tokens<br>{_cell(base['text'])} "
                     f"| **{new['reward']:+.2f}**, {new['tokens']} tokens<br>{_cell(new['text'])} |")  # fmt: skip
    lines.append("")
    return lines
