"""Reports: the one home of every report.md, report.html, report.json and plot a stage writes.

- reward stage: `write_reward_report` (report.md: data, pairs and the quality gate,
  rendered from `align.evaluation.GateResult.checks`), `plot_calibration`,
  `plot_length`.
- compare stage (and its human verdict, `stages/compare_human.py`, which rebuilds the
  same report from report.json and samples.jsonl): `write_compare_report` writes
  report.json, the PNG plots (`compare_plots`), report.md (`render_compare_report`)
  and report.html; the numbers themselves come from `align.comparison` (their
  definitions are in its docstring).

Every file goes through `align.files` (atomic: a reader never sees half a report).
Over 450 lines because the compare report is long prose around its tables and four
plots; splitting the plots off would leave one report in two homes.
Hand-written glue: no library builds this kind of report.
"""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path

import numpy as np

from align.comparison import SAMPLES, VERDICTS, fmt, fmt_pct, group_by_prompt
from align.files import atomic_path, atomic_write_text, json_safe

REPORT_MD, REPORT_HTML, REPORT_JSON = "report.md", "report.html", "report.json"
PLOTS = {
    "reward_distributions": "reward_distributions.png",
    "win_rate": "win_rate.png",
    "length_vs_reward": "length_vs_reward.png",
    "style": "style_pass_rates.png",
}
REWARD_PLOTS = {"calibration": "calibration.png", "length": "length.png"}


def _pyplot():
    """(matplotlib, pyplot) on the Agg backend: files only, no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save_figure(fig, path: Path, dpi: int, **savefig) -> None:
    """tight_layout, then an atomic PNG write; the figure is closed."""
    _, plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig)
    plt.close(fig)


def _fmt3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- reward stage


def plot_calibration(path: Path, table: list[dict]) -> None:
    """Predicted vs observed preference per calibration bin (`align.evaluation.calibration_bins`)."""
    _, plt = _pyplot()
    table = [row for row in table if row["count"]]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.plot([row["mean_probability"] for row in table], [row["observed"] for row in table], marker="o",
              label="reward model")
    axis.set_xlabel("predicted P(A preferred) = sigmoid(r_A - r_B)")
    axis.set_ylabel("observed frequency A preferred")
    axis.set_title("Calibration on held-out pairs")
    axis.legend(loc="upper left")
    _save_figure(figure, path, dpi=100)


def plot_length(path: Path, scores, lengths, correlation: float) -> None:
    _, plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.scatter(lengths, scores, s=12, alpha=0.6)
    axis.set_xlabel("response length (tokens)")
    axis.set_ylabel("reward score")
    axis.set_title(f"Score vs length (Spearman {correlation:.2f})")
    _save_figure(figure, path, dpi=100)


def write_reward_report(folder: Path, run: str, pair_report, split: dict, metrics: dict, gate, *, ties: str,
                        aggregation: str, bad_rankings: str, calibration_bins: int) -> Path:
    """report.md of the reward stage. pair_report: `align.preferences.PairReport`; split: the split counts;
    metrics: the held-out metrics; gate: `align.evaluation.GateResult`."""
    verdict = "PASSED" if gate.passed else "FAILED"
    lines = [f"# Reward model report: run `{run}`", "",
             f"**Quality gate: {verdict}.**" + ("" if gate.passed else
             " This reward model should not be optimized against as it is. Why: " + "; ".join(gate.reasons)
             + ". Later stages warn, or refuse with `reward_gate_policy: refuse`."), "",
             "## Data", "",
             f"- {pair_report.records} rankings ({pair_report.records_used} used) on {pair_report.prompts} prompts "
             f"by {pair_report.annotators} annotator(s) -> {pair_report.pairs} pairs "
             f"(ties: `{ties}`, {pair_report.ties_dropped} tied pairs dropped, {pair_report.tie_pairs} soft "
             f"tie pairs; aggregation: `{aggregation}`)",
             f"- duplicates dropped: {pair_report.duplicates_dropped}; bad rankings: {len(pair_report.bad)} "
             f"(policy `{bad_rankings}`)",
             f"- split by prompt: train {split['train_pairs']} pairs / {split['train_prompts']} prompts, held-out "
             f"{split['heldout_pairs']} pairs / {split['heldout_prompts']} prompts; longer than max_length "
             f"(dropped): {split['dropped_too_long_train']} train, "
             f"{split['dropped_too_long_heldout']} held-out"]
    if pair_report.agreement_rate is not None:
        per_prompt = ", ".join(f"{n} annotators: {count} prompts"
                               for n, count in sorted(pair_report.annotators_per_prompt.items()))
        lines.append(f"- annotator agreement: {pair_report.agreement_rate:.1%} of "
                     f"{pair_report.agreement_comparisons} pairwise comparisons ({per_prompt})")
    else:
        lines.append("- annotator agreement: no prompt was ranked by two annotators")
    if pair_report.bad:
        lines += ["", "### Bad rankings (left out)", ""] + [f"- `{bad}`" for bad in pair_report.bad]
    lines += ["", "## Quality gate (held-out pairs)", ""]
    if gate.checks:
        lines += ["| check | value | threshold | result |", "| --- | --- | --- | --- |"]
        for check in gate.checks:
            result = {None: "-", True: "PASS", False: "FAIL"}[check.passed]
            lines.append(f"| {check.label} | {_fmt3(check.value)} | {check.threshold_text} | {result} |")
        low, high = metrics["pairwise_accuracy_ci95"]
        lines += ["",
                  f"Pairwise accuracy: share of held-out pairs where the chosen response scores higher (95% "
                  f"bootstrap interval {low:.3f}-{high:.3f}). ECE: each pair read both ways, predicted "
                  f"sigmoid(r_A - r_B) against what annotators chose, {calibration_bins} equal-width bins. "
                  f"Length correlation: Spearman between score and response length over the distinct held-out "
                  f"responses. The chosen response is the longer one in "
                  f"{metrics['chosen_longer_fraction']:.0%} of held-out pairs; the model scores the longer one "
                  f"higher in {metrics['longer_scored_higher_fraction']:.0%} (far apart: it leans on length; "
                  "`length_decorrelation` in configs/reward.yaml).", "",
                  f"![calibration]({REWARD_PLOTS['calibration']}) ![score vs length]({REWARD_PLOTS['length']})"]
    else:
        lines.append("Not measured: " + "; ".join(gate.reasons))
    return atomic_write_text(Path(folder) / REPORT_MD, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- compare stage: files


def write_compare_report(folder: Path, results: dict, rows: list[dict]) -> list[str]:
    """report.json, PNG plots, report.md and report.html (when `markdown` is installed); atomic per file."""
    folder = Path(folder)
    results = json_safe(results)  # render what report.json holds (NaN -> null), after compare and after a pull alike
    results["plots"] = compare_plots(folder, results, rows)
    plots = results["plots"]
    atomic_write_text(folder / REPORT_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    markdown_text = render_compare_report(results, rows)
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
            f"</head><body>{body}</body></html>\n")
    atomic_write_text(folder / REPORT_HTML, page)
    return [*written, REPORT_HTML]


# ----------------------------------------------------------------------------- compare stage: plots


def compare_plots(folder: Path, results: dict, rows: list[dict]) -> dict[str, str]:
    matplotlib, plt = _pyplot()
    models = results["model_order"]
    colors = {model: plt.get_cmap("tab10")(index) for index, model in enumerate(models)}
    by_model = {model: [row for row in rows if row["model"] == model] for model in models}
    subtitle = f"run {results['run']}, {results['prompts']} held-out prompts x {results['settings']['n']} samples"

    def save(fig, key):
        _save_figure(fig, folder / PLOTS[key], dpi=110, bbox_inches="tight")  # keeps legends placed below the axes

    # 1. reward distributions
    fig, ax = plt.subplots(figsize=(8, 4.5))
    all_rewards = [row["reward"] for row in rows]
    bins = np.linspace(min(all_rewards), max(all_rewards), 31) if max(all_rewards) > min(all_rewards) else 10
    for model in models:
        values = [row["reward"] for row in by_model[model]]
        mean = results["models"][model]["reward"]["mean"]
        ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.35, color=colors[model],
                label=f"{model} (mean {mean:+.2f}, {len(values)} responses)")
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
        judge = comparison.get("judge")
        if judge:
            entries.append((f"{name}\nLLM judge ({judge['pairs']} pairs)", judge, "tab:green"))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.0 * len(entries)))
    for y, (label, w, color) in enumerate(entries):
        if w["wins"] + w["losses"] == 0:
            ax.text(0.5, y, "no decided pairs", ha="center", va="center")
            continue
        ax.errorbar(w["rate"], y, xerr=[[w["rate"] - w["low"]], [w["high"] - w["rate"]]], fmt="o", color=color,
                    capsize=6, markersize=8, linewidth=2)
        ax.annotate(f"{w['rate']:.0%} [{w['low']:.0%}, {w['high']:.0%}]\n{w['wins']} won / {w['losses']} lost / "
                    f"{w['ties']} ties", (w["rate"], y), textcoords="offset points", xytext=(0, 12), ha="center",
                    fontsize=8)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1.5)
    ax.text(0.51, len(entries) - 0.45, "50% = no preference", color="grey", ha="left", va="bottom", fontsize=8)
    ax.set_yticks(range(len(entries)), [entry[0] for entry in entries], fontsize=9)
    ax.set_ylim(len(entries) - 0.4, -0.7)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("win rate of the aligned model (ties left out), 95% Wilson interval")
    unit = ("per prompt" if len(entries) == len(results["comparisons"]) else
            "reward model per prompt; humans and the judge per answer pair")
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
                   label=f"{model} (mean {np.mean(tokens):.0f} tokens, Spearman {rho_text})")
    limit = results["settings"]["max_new_tokens"]
    ax.axvline(limit, color="grey", linestyle=":", linewidth=1.2, label=f"max_new_tokens {limit}: responses here were cut off")
    ax.set_xlim(0, limit * 1.08)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward-model score")
    ax.set_title(f"Length vs reward: a rising cloud for the aligned model hints at length hacking\n{subtitle}",
                 fontsize=10)
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


# ----------------------------------------------------------------------------- compare stage: report.md


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


def render_compare_report(results: dict, rows: list[dict]) -> str:
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
                     f"`{info['checkpoint']['manifest_sha256'][:12]}`) |")
    reward = results["reward_model"]
    gate = {True: "passed", False: "**FAILED**", None: "not recorded"}[reward.get("gate_passed")]
    lines += [
        f"| reward model | `{reward['path']}` (quality gate {gate}) |",
        f"| prompts | {results['prompts']} held-out prompts from `{results['prompts_file']}` |",
        f"| decoding (every model) | {s['n']} samples per prompt, temperature {s['temperature']}, top_p {s['top_p']}, "
        f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}; backend {results['backend']} |",
        f"| KL samples | {results['kl_settings']} |",
        f"| answers cut at max_new_tokens | scored {results['options'].get('truncation_penalty', 0.0):g} below the "
        f"reward model (an unfinished answer is not judged as a finished one; align.scoring.effective_reward) |",
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
        "| model | mean reward [95% CI] | reward model alone | mean length (tokens) | words | cut off at max_new_tokens "
        "| style score | reward-length Spearman |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in models:
        m = results["models"][model]
        rho = m["reward_length_spearman"]
        rho_text = fmt(rho, "+.2f")
        raw = fmt(m.get("reward_model_score_mean"), "+.2f")
        lines.append(f"| {model} | {_interval(m['reward'], signed=True)} | {raw} | {m['tokens_mean']:.1f} "
                     f"| {m['words_mean']:.1f} | {m['truncated_share']:.0%} | {m['style_score']:.0%} | {rho_text} |")
    rules = list(results["models"][models[0]]["style_pass_rates"])
    lines += ["", "House-style pass rates (share of responses passing each rule of data/README.md):", "",
              "| rule | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
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
                     "upwards when the sampler runs in lower precision (bf16) than the forward passes |")
    lines += [
        f"| length change | {fmt(comparison['length_change'], '+.0%')} | mean response tokens "
        f"{results['models'][aligned]['tokens_mean']:.1f} vs {results['models'][baseline]['tokens_mean']:.1f} "
        "(a cut answer counts at the cap) |",
    ]
    if "finished_length_change" in comparison:  # reports written before cut answers were counted lack it
        a_model, b_model = results["models"][aligned], results["models"][baseline]
        lines.append(f"| finished-answer length change | {fmt(comparison['finished_length_change'], '+.0%')} | mean "
                     f"tokens of the answers that ended, {fmt(a_model['finished_tokens_mean'], '.1f')} vs "
                     f"{fmt(b_model['finished_tokens_mean'], '.1f')}; cut at the cap: {a_model['truncated_share']:.0%} vs "
                     f"{b_model['truncated_share']:.0%} |")
    adjusted = comparison.get("length_adjusted_difference")  # None with one sample per prompt, or older reports
    if adjusted:
        lines.append(f"| length-adjusted reward difference | {adjusted['difference']:+.3f} [{adjusted['low']:+.3f}, "
                     f"{adjusted['high']:+.3f}] | the reward difference less what the length change explains at the "
                     f"reward model's own length slope ({adjusted['slope']:+.3f} reward per unit of log length, "
                     "measured between samples of one model for one prompt); interval above 0 = better at equal length |")
    lines += [
        f"| style score change | {comparison['style_score_change']:+.0%} | share of house-style rules passed, "
        f"{aligned} minus {baseline} |",
    ]
    human = comparison.get("human")
    if human:
        lines.append(f"| **human win rate** | {fmt_pct(human['rate'])} [{fmt_pct(human['low'])}, {fmt_pct(human['high'])}] "
                     f"| blind A/B in Argilla: {human['wins']} pairs won, {human['losses']} lost, {human['ties']} tied; "
                     f"{human['answers']} answers by {len(human['annotators'])} annotator(s) on "
                     f"{human['pairs_answered']} of {human['pairs_pushed']} pairs |")
    judge = comparison.get("judge")
    if judge:
        lines.append(f"| **LLM-judge win rate** | {fmt_pct(judge['rate'])} [{fmt_pct(judge['low'])}, "
                     f"{fmt_pct(judge['high'])}] | {judge['wins']} answer pairs won, {judge['losses']} lost, "
                     f"{judge['ties']} tied, both orders asked (section below) |")
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
                  "responses to Argilla; once annotated, `make compare-pull RUN=...` adds the human win rate here."]
    if judge:
        lines += ["", "### LLM judge", "",
                  f"{results.get('judge', {}).get('model', 'The judge')} judged {judge['pairs']} answer pairs "
                  f"(sample i of {baseline} against sample i of {aligned}, every prompt), each in both orders; a pair "
                  f"is won only when both orders pick the same answer, so position bias cancels. {aligned} won "
                  f"{fmt_pct(judge['rate'])} of the pairs decided [{fmt_pct(judge['low'])}, {fmt_pct(judge['high'])}]; "
                  f"{judge['ties']} ties, {judge['unreadable']} unreadable answers. Position consistency (both orders "
                  f"name the same answer or both say tie): {fmt_pct(judge['position_consistency'])}. The judge and the "
                  f"reward model picked the same answer on {fmt_pct(judge['reward_model_agreement'])} of the "
                  f"{judge['agreement_pairs']} pairs both decided. Every call: `judge.jsonl`."]
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
                     f"| **{new['reward']:+.2f}**, {new['tokens']} tokens<br>{_cell(new['text'])} |")
    lines.append("")
    return lines
