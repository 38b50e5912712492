"""Compare: did alignment make the model better, and at what cost?

Consumes
    - two or more checkpoints: by default runs/<run>/sft (the baseline) and every finished
      aligned stage among `aligned_stages` (dpo, ppo, rloo), all in one report; or
      `checkpoints:` stage folders, the first being the baseline
    - the reward model runs/<run>/reward (or `reward_dir`), checked against its gate
    - `prompts_file`: held-out prompts (data/eval_prompts.jsonl)

Produces runs/<run>/compare/: report.md (+ report.html), report.json (every number),
samples.jsonl (every response with its reward, length, style checks), judge.jsonl (with
`judge_url`: every LLM-judge call), PNG plots
(reward distributions, win rate, length vs reward, style pass rates), config.yaml,
logs/, manifest.json; and a one-line verdict per aligned model.

How
    - Every model answers every prompt with the same decoding settings and seed
      (align.generation), `samples_per_prompt` samples each.
    - The reward model scores every response in THE reward layout (align.scoring).
    - KL(aligned || baseline) on samples drawn from the aligned model at
      `kl_temperature` (1.0: the estimate is unbiased only for the model's own
      distribution), both log-probabilities from a forward pass with the same
      settings (align.logprobs), so a model compared with itself gives exactly 0.
    - Optionally an LLM judge behind an OpenAI-compatible server (`judge_url`): every answer
      pair in both orders, ties allowed, its agreement with the reward model (align/judge.py).
    - Numbers: align/comparison.py (definitions in its docstring) and the paired
      statistics of align/evaluation.py; report and plots: align/reports.py.

Up to date (same config, compared checkpoints, reward model, prompts, code and versions
as the finished runs/<run>/compare): one line, nothing regenerated; `--force` redoes it
(align/runs.py). A human verdict pulled into the report stays until compare reruns.

Run: make compare [RUN=name] [ARGS="--samples_per_prompt 8 ..."]
Then, for a human verdict: make compare-to-argilla, annotate, make compare-pull
(stages/compare_human.py).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from align import comparison, cost, data, files, hardware, judge, logprobs, models, reports, runs
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn, warn_skipped
from align.errors import AlignError, ConfigError, LineageError
from align.generation import Backend, SamplingSettings, create_generator, render_prompts
from align.hardware import Precision
from align.logprobs import KLEstimator
from align.runs import GatePolicy
from align.scoring import load_reward_checkpoint


@dataclass
class CompareArgs:
    """Keys of configs/compare.yaml."""

    RENAMED: ClassVar[dict[str, str]] = {"backend": "generation_backend", "dtype": "generation_dtype",
                                         "reward_checkpoint": "reward_dir"}

    run: str = field(default="default", metadata={"help": "run name: reads runs/<run>/..., writes runs/<run>/compare"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "stage folders to compare (runs/<run>/<stage>), the first is the baseline; empty = baseline_stage "
                "and every finished one of aligned_stages of this run"})
    baseline_stage: str = field(default="sft", metadata={"help": "baseline stage when checkpoints is empty"})
    aligned_stages: list[str] = field(default_factory=lambda: ["dpo", "ppo", "rloo"], metadata={
        "help": "every finished one of these stages is compared with the baseline (when checkpoints is empty)"})
    prompts_file: str = field(default="data/eval_prompts.jsonl", metadata={"help": "held-out prompts JSONL"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    reward_dir: str | None = field(default=None, metadata={"help": "reward stage folder (default runs/<run>/reward)"})
    reward_gate_policy: GatePolicy = field(default="warn", metadata={
        "help": "warn | refuse when the reward model failed its gate"})
    score_batch_size: int = field(default=16, metadata={"help": "reward scoring batch"})
    # decoding: identical for every model
    generation_backend: Backend = field(default="auto", metadata={"help": "auto | vllm | hf | openai"})
    generation_dtype: Precision = field(default="auto", metadata={"help": "auto | bf16 | fp32"})
    server_url: str | None = field(default=None, metadata={"help": "vLLM server for generation_backend openai"})
    seed: int = field(default=1234, metadata={"help": "sampling seed, the same for every model"})
    samples_per_prompt: int = field(default=4, metadata={
        "help": "responses per prompt and model: the interval is mostly sampling noise, so more samples narrow it"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (0 = greedy); 1.0: each model's own distribution, the KL reuses the samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=256, metadata={
        "help": "response length cap: 2x the 95th percentile of the example SFT answers (116 tokens)"})
    truncation_penalty: float = field(default=1.0, metadata={
        "help": "an answer cut at max_new_tokens scores this much below the reward model (align.scoring.effective_reward)"})
    # KL
    kl_temperature: float = field(default=1.0, metadata={"help": "temperature of the aligned samples the KL is estimated on"})
    kl_samples_per_prompt: int | None = field(default=None, metadata={
        "help": "aligned samples per prompt for the KL; null: samples_per_prompt (at kl_temperature: the same samples)"})
    kl_estimator: KLEstimator = field(default="k3", metadata={"help": "k3 (>= 0, low variance) | k1 (log-ratio)"})
    kl_dtype: Precision = field(default="fp32", metadata={"help": "dtype of the KL forward passes: auto | bf16 | fp32"})
    kl_batch_size: int = field(default=8, metadata={"help": "KL forward-pass batch"})
    # statistics and report
    bootstrap_resamples: int = field(default=2000, metadata={"help": "bootstrap resamples for intervals"})
    confidence: float = field(default=0.95, metadata={"help": "interval coverage"})
    tie_tolerance: float = field(default=0.0, metadata={"help": "prompt rewards closer than this are a tie"})
    length_warn: float = field(default=0.2, metadata={"help": "warn when responses grow by more than this fraction"})
    style_warn: float = field(default=0.1, metadata={"help": "warn when a style rule's pass rate drops by more than this"})
    example_rows: int = field(default=6, metadata={"help": "prompts in the examples table"})


def main(argv=None):
    parsed = parse_stage_config("compare", (CompareArgs, judge.JudgeArgs), argv)
    args, judge_args = parsed
    if not 0 < args.confidence < 1:
        raise ConfigError(f"confidence: must be between 0 and 1, got {args.confidence}")
    for key in ("samples_per_prompt", "kl_samples_per_prompt"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(args, key)}")
    settings, kl_settings = sampling_settings(args)

    # Inputs, all checked before any generation.
    skipped: list = []  # malformed pairs, when prompts_file is a preference dataset (its held-out pairs)
    prompts = data.load_prompts(args.prompts_file, skipped)[: args.max_prompts]
    checkpoints = checkpoints_to_compare(args)
    labels = model_labels(checkpoints)
    config = resolved_config(args, judge_args)
    # a pure function of its parents and config: the same ones give the same report
    parents = {**dict(zip(labels, checkpoints)),  # labels have no spaces: "reward model" cannot clash
               "reward model": runs.find_checkpoint(args.run, ["reward"], args.reward_dir)}
    fingerprint = runs.stage_fingerprint("compare", config, parents, runs.data_inputs(args.prompts_file))
    if runs.skip_if_up_to_date(args.run, "compare", config, fingerprint, parsed.force):
        return
    warn_skipped(skipped)
    check_same_prompt_format(checkpoints, labels)
    llm_judge = judge.Judge(judge_args) if judge_args.judge_url else None  # unreachable: one line, before any work
    if llm_judge is not None:
        print(f"[compare] LLM judge: {llm_judge.describe()}, every answer pair in both orders", flush=True)
    scorer = load_reward_checkpoint(args.run, args.reward_gate_policy, args.reward_dir, batch_size=args.score_batch_size)
    conversations = [prompt["prompt"] for prompt in prompts]
    print(f"[compare] {', '.join(labels)} on {len(prompts)} prompts x {settings.n} samples "
          f"(temperature {settings.temperature}, seed {settings.seed}); baseline {labels[0]}", flush=True)

    with runs.stage_output(args.run, "compare", config, args.seed, parent=checkpoints[-1],
                           fingerprint=fingerprint) as out:
        out.add_input(args.prompts_file, "prompts", len(prompts))
        out.set(checkpoints={label: c.as_parent() for label, c in zip(labels, checkpoints)},
                reward_model=scorer.checkpoint.as_parent())
        # 1. generate, 2. score, 3. KL, 4. numbers, 5. report
        with cost.phase("generate"):  # engine start-up included: it is part of the stage's time
            outputs, kl_outputs, backend = generate_all(args, checkpoints, labels, conversations, settings, kl_settings)
        rows = [row for label, checkpoint in zip(labels, checkpoints)
                for row in comparison.response_rows(prompts, label, outputs[label], str(checkpoint.folder))]
        with cost.phase("score"):
            comparison.score_rows(scorer, rows, args.truncation_penalty)
        score_dtype = scorer.dtype
        reward_model = {**scorer.checkpoint.as_parent(),
                        "gate_passed": scorer.checkpoint.manifest.get("metrics", {}).get("gate_passed")}
        del scorer
        gc.collect()
        with cost.phase("kl"):
            kl = kl_estimates(args, checkpoints, labels, conversations, [p["prompt_id"] for p in prompts], kl_outputs)
        out.metrics["cost"] = cost.report(hardware.torch_dtype_name(args.generation_dtype), phase_dtypes={
            "score": score_dtype, "kl": hardware.torch_dtype_name(args.kl_dtype)})
        files.write_jsonl(out.path / comparison.SAMPLES, rows)
        results = compare_results(args, labels, checkpoints, rows, kl, settings, kl_settings,
                                  prompts=len(prompts), backend=backend, reward_model=reward_model)
        if llm_judge is not None:
            files.write_jsonl(out.path / JUDGE_FILE, judge_comparisons(llm_judge, results, rows, args))
        reports.write_compare_report(out.path, results, rows)
        comparisons = results["comparisons"]
        out.metrics.update(files.json_safe({"verdicts": {c["aligned"]: c["verdict"] for c in comparisons}, **{
            f"{c['aligned']}_{key}": value for c in comparisons for key, value in flat_metrics(c).items()}}))
    for c in comparisons:
        print(c["verdict_line"], flush=True)
        if c.get("judge"):
            j = c["judge"]
            print(f"[compare] {c['aligned']} vs {c['baseline']}: LLM judge win rate {comparison.fmt_pct(j['rate'])} "
                  f"[{comparison.fmt_pct(j['low'])}, {comparison.fmt_pct(j['high'])}] ({j['wins']} won, {j['losses']} "
                  f"lost, {j['ties']} tied, {j['unreadable']} unreadable), position consistency "
                  f"{comparison.fmt_pct(j['position_consistency'])}, agrees with the reward model on "
                  f"{comparison.fmt_pct(j['reward_model_agreement'])}", flush=True)
        if c["verdict"] == "worse":
            warn(f"{c['aligned']} scores worse than {c['baseline']}; see {out.path / reports.REPORT_MD}")
    summary("compare", prompts=len(prompts), models=", ".join(labels), compute=cost.summary_text(out.metrics["cost"]),
            report=str(out.path / reports.REPORT_MD))


def sampling_settings(args: CompareArgs) -> tuple[SamplingSettings, SamplingSettings | None]:
    """The decoding settings of every model, and those of the KL samples (None: reuse the comparison samples,
    which are the aligned model's own distribution when temperature == kl_temperature and top_p == 1)."""
    settings = SamplingSettings(n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    kl_samples = kl_samples_per_prompt(args)
    reuse = args.temperature == args.kl_temperature and args.top_p == 1.0 and kl_samples == args.samples_per_prompt
    kl_settings = None if reuse else SamplingSettings(n=kl_samples, temperature=args.kl_temperature,
                                                      max_new_tokens=args.max_new_tokens, seed=args.seed)
    return settings, kl_settings


def kl_samples_per_prompt(args: CompareArgs) -> int:
    """The KL's samples per prompt: `kl_samples_per_prompt`, or by default `samples_per_prompt`."""
    return args.kl_samples_per_prompt or args.samples_per_prompt


def checkpoints_to_compare(args: CompareArgs) -> list[runs.Checkpoint]:
    if args.checkpoints:
        if len(args.checkpoints) < 2:
            raise ConfigError(f"checkpoints: give at least two stage folders (baseline first), got {args.checkpoints}")
        found = [runs.read_checkpoint(folder) for folder in args.checkpoints]
    else:
        baseline = runs.find_checkpoint(args.run, [args.baseline_stage])  # checked first: the lineage's root
        aligned = [runs.read_checkpoint(runs.stage_dir(args.run, stage)) for stage in args.aligned_stages
                   if (runs.stage_dir(args.run, stage) / runs.MANIFEST).is_file()]
        if not aligned:
            runs.find_checkpoint(args.run, args.aligned_stages)  # raises: none finished, with what to run
        found = [baseline, *aligned]
    for checkpoint in found:
        if not (checkpoint.folder / "model" / "config.json").is_file():
            raise LineageError(f"{checkpoint.folder}: no model/ folder with config.json; is this a model stage?")
    return found


def model_labels(checkpoints: list[runs.Checkpoint]) -> list[str]:
    """Stage names, made unique with the run name (and a number) when two share one."""
    labels = [checkpoint.stage for checkpoint in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{c.manifest.get('run', c.folder.parent.name)}/{c.stage}" for c in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{index}" for index, label in enumerate(labels)]
    return labels


def check_same_prompt_format(checkpoints, labels) -> None:
    """Identical inputs need identical chat templates: otherwise prompts (and the KL) differ."""
    hashes = {label: models.chat_template_hash(models.load_tokenizer(c.model_path)) for c, label in zip(checkpoints, labels)}
    if len(set(hashes.values())) > 1:
        raise AlignError(f"the checkpoints' chat templates differ ({hashes}); the comparison would feed them "
                         "different prompts: compare models fine-tuned from the same base")


def generate_all(args, checkpoints, labels, conversations, settings, kl_settings):
    """{label: per prompt, per sample: Sample} and, for aligned models, the KL samples."""
    outputs, kl_outputs = {}, {}
    for index, (checkpoint, label) in enumerate(zip(checkpoints, labels)):
        print(f"[compare] generating with {label} ({checkpoint.model_path})", flush=True)
        with create_generator(checkpoint.model_path, args.generation_backend, args.generation_dtype,
                              server_url=args.server_url,
                              seed=args.seed) as generator:
            outputs[label] = generator.generate(conversations, settings, progress=True)
            if index > 0 and kl_settings is not None:
                kl_outputs[label] = generator.generate(conversations, kl_settings, progress=True)
            backend = generator.describe()
        gc.collect()
    if kl_settings is None:  # the comparison samples were drawn at the KL temperature: reuse them
        kl_outputs = {label: outputs[label] for label in labels[1:]}
    return outputs, kl_outputs, backend


def kl_estimates(args, checkpoints, labels, conversations, prompt_ids, kl_outputs) -> dict[str, dict]:
    """Per aligned model: per-sample KL(aligned || baseline) from forward passes of both models."""
    tokenizer = models.load_tokenizer(checkpoints[0].model_path, padding_side="left")
    rendered = render_prompts(tokenizer, conversations)
    flat = {}
    for label in labels[1:]:
        rows = [(prompt_ids[i], rendered[i], sample.token_ids) for i, samples in enumerate(kl_outputs[label]) for sample in samples]
        flat[label] = rows
    policy_logprobs = {}
    for checkpoint, label in zip(checkpoints[1:], labels[1:]):
        model = models.load_causal_lm(checkpoint.model_path, hardware.torch_dtype_name(args.kl_dtype))
        rows = flat[label]
        policy_logprobs[label] = logprobs.completion_logprobs(
            model, [r[1] for r in rows], [r[2] for r in rows], tokenizer.pad_token_id, args.kl_batch_size,
            progress=f"log p {label}")
        del model
        gc.collect()
    baseline = models.load_causal_lm(checkpoints[0].model_path, hardware.torch_dtype_name(args.kl_dtype))
    results = {}
    for label in labels[1:]:
        rows = flat[label]
        reference = logprobs.completion_logprobs(
            baseline, [r[1] for r in rows], [r[2] for r in rows], tokenizer.pad_token_id, args.kl_batch_size,
            progress=f"log p {labels[0]} on {label} samples")
        results[label] = {
            "estimator": args.kl_estimator,
            "values": logprobs.kl_per_sequence(policy_logprobs[label], reference, args.kl_estimator),
            "k1": logprobs.kl_per_sequence(policy_logprobs[label], reference, "k1"),
            "prompt_ids": [r[0] for r in rows],
            "tokens": sum(len(r[2]) for r in rows),
        }
    del baseline
    gc.collect()
    return results


def compare_results(args, labels, checkpoints, rows, kl, settings, kl_settings, *, prompts: int, backend: str,
                    reward_model: dict) -> dict:
    """What report.json holds: per-model summaries and one comparison per aligned model (align.comparison)."""
    options = {"bootstrap_resamples": args.bootstrap_resamples, "seed": args.seed, "confidence": args.confidence,
               "tie_tolerance": args.tie_tolerance, "length_warn": args.length_warn, "style_warn": args.style_warn,
               "example_rows": args.example_rows, "truncation_penalty": args.truncation_penalty}
    summaries, comparisons = comparison.compare_models(rows, labels, kl, options)
    for label, checkpoint in zip(labels, checkpoints):
        summaries[label]["checkpoint"] = checkpoint.as_parent()
    kl_text = ("the comparison samples themselves" if kl_settings is None else
               f"{kl_samples_per_prompt(args)} separate sample(s) per prompt from each aligned model at temperature "
               f"{args.kl_temperature}, top_p 1.0, seed {args.seed} (the estimate is unbiased only for the model's "
               f"own distribution)")
    return {
        "title": f"Compare: {', '.join(labels[1:])} vs {labels[0]} (run {args.run})",
        "run": args.run, "baseline": labels[0], "model_order": labels, "prompts": prompts,
        "prompts_file": args.prompts_file, "backend": backend, "settings": asdict(settings),
        "kl_settings": f"{kl_text}; estimator {args.kl_estimator}; forward passes in "
                       f"{hardware.torch_dtype_name(args.kl_dtype)}",
        "reward_model": reward_model, "options": options, "models": summaries,
        "comparisons": comparisons,
    }


JUDGE_FILE = "judge.jsonl"


def judge_comparisons(llm_judge, results: dict, rows: list[dict], args: CompareArgs) -> list[dict]:
    """The LLM judge on every comparison's answer pairs (align/judge.py): its numbers go into
    each comparison of `results`, every call into the returned rows (judge.jsonl)."""
    results["judge"] = {"model": llm_judge.model, "url": llm_judge.url, "structured": llm_judge.args.judge_structured,
                        "template": "built in" if llm_judge.args.judge_prompt_file is None else llm_judge.args.judge_prompt_file}
    calls = []
    for c in results["comparisons"]:
        pairs = judge.pairs_to_judge(rows, c["baseline"], c["aligned"], args.tie_tolerance)
        judged = llm_judge.judge_pairs(pairs, progress=f"judge: {c['aligned']} vs {c['baseline']}")
        c["judge"] = judge.judge_summary(judged, args.confidence)
        calls += [{"baseline": c["baseline"], "aligned": c["aligned"],
                   **{key: value for key, value in row.items() if key != "prompt"}} for row in judged]
    return calls


def flat_metrics(c: dict) -> dict:
    metrics = {"reward_difference": c["reward_difference"]["difference"], "reward_difference_low": c["reward_difference"]["low"],
               "reward_difference_high": c["reward_difference"]["high"], "win_rate": c["win_rate"]["rate"],
               "win_rate_low": c["win_rate"]["low"], "win_rate_high": c["win_rate"]["high"],
               "length_change": c["length_change"]}
    if c["kl"]:
        metrics["kl"] = c["kl"]["mean"]
    if c.get("length_adjusted_difference"):
        adjusted = c["length_adjusted_difference"]
        metrics.update(length_adjusted_difference=adjusted["difference"], length_adjusted_difference_low=adjusted["low"],
                       length_adjusted_difference_high=adjusted["high"], reward_length_slope=adjusted["slope"])
    if c.get("judge"):
        metrics.update({f"judge_{key}": c["judge"][key] for key in ("rate", "low", "high", "wins", "losses", "ties",
                                                                    "position_consistency", "reward_model_agreement")})
    return metrics


if __name__ == "__main__":
    run_stage(main, single_process="one engine samples both models, one report")
