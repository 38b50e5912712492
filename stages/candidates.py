"""Candidates: the SFT model samples K responses per prompt, for humans to rank in Argilla.

Consumes
    - runs/<run>/sft (the latest finished SFT checkpoint; `sft_dir` names another)
    - `prompts_file`: prompts JSONL (data/README.md; default data/candidate_prompts.jsonl,
      unlabelled prompts kept apart from the held-out eval prompts),
      the first `max_prompts` of them (0 = all)
    - optionally runs/<run>/reward (or `reward_dir`): when a reward model exists its
      ranking of each prompt's candidates goes to Argilla as a suggestion

Produces runs/<run>/candidates/: candidates.jsonl (one record per prompt: prompt,
K candidates with finish reason, token count, log-probability and reward score,
suggested ranking), config.yaml, logs/, manifest.json (parent = the SFT checkpoint,
Argilla dataset, sampling settings, generation backend, timings). With `push: true`
(the default) one record per prompt is upserted into the Argilla ranking dataset
`argilla_dataset` (default `<run>-candidates`); pushing again updates, never duplicates.

Features and assumptions
    - Sampling through align.generation (`backend: auto` = the backend
      bench/bench_generation.py measured fastest here); seeded, so reruns repeat.
    - Argilla is contacted before sampling, so a missing server fails in seconds;
      `--push false` works offline and only writes the file.
    - Candidate order is shuffled per record by align.argilla_io (position bias).
    - Suggested ranking: rank 1 = highest reward score, equal scores share a rank.

Always runs (no up-to-date check, unlike the training stages): its job is the push, and
a local fingerprint cannot vouch for what the server holds now. `--force` changes nothing.

Run: make candidates [RUN=name] [ARGS="--k 4 --max_prompts 50 --push false"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from align import cost, data, files, generation, hardware, runs
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn
from align.errors import ConfigError
from align.generation import Backend
from align.hardware import Precision

EMPTY_PLACEHOLDER = "(empty response)"  # Argilla refuses empty text fields


@dataclass
class CandidatesStageArgs:
    run: str = field(default="default", metadata={"help": "parent runs/<run>/sft, output runs/<run>/candidates"})
    sft_dir: str | None = field(default=None, metadata={"help": "an explicit SFT stage folder (not runs/<run>/sft)"})
    prompts_file: str = field(default="data/candidate_prompts.jsonl", metadata={"help": "prompts JSONL"})
    max_prompts: int = field(default=20, metadata={"help": "use the first N prompts (0 = all)"})
    k: int = field(default=4, metadata={"help": "candidates sampled per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest candidate, in tokens"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})
    generation_backend: Backend = field(default="auto", metadata={"help": "auto | vllm | hf | openai"})
    generation_dtype: Precision = field(default="auto", metadata={"help": "auto | bf16 | fp32 (auto: bf16 where native)"})
    server_url: str | None = field(default=None, metadata={"help": "vLLM server for backend openai"})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "vLLM KV cache size (GiB)"})
    push: bool = field(default=True, metadata={"help": "push to Argilla (false: only write the file)"})
    argilla_dataset: str | None = field(default=None, metadata={"help": "dataset name (default <run>-candidates)"})
    argilla_workspace: str = field(default="align", metadata={"help": "Argilla workspace"})
    min_submitted: int = field(default=1, metadata={"help": "annotators wanted per record"})
    guidelines_file: str | None = field(default=None, metadata={"help": "markdown guidelines for annotators"})
    suggest_with_reward: bool = field(default=True, metadata={"help": "suggest a ranking when a reward model exists"})
    reward_dir: str | None = field(default=None, metadata={"help": "an explicit reward stage folder"})
    reward_gate_policy: runs.GatePolicy = field(default="warn", metadata={"help": "reward model failed its gate: warn | refuse"})

    RENAMED: ClassVar[dict[str, str]] = {"backend": "generation_backend", "precision": "generation_dtype"}


def check_args(args: CandidatesStageArgs) -> None:
    if args.k < 2:
        raise ConfigError(f"k: a ranking needs at least 2 candidates per prompt, got {args.k}")
    if args.max_prompts < 0:
        raise ConfigError(f"max_prompts: must be >= 0 (0 = all), got {args.max_prompts}")
    if args.guidelines_file and not Path(args.guidelines_file).is_file():
        raise ConfigError(f"guidelines_file: {args.guidelines_file} not found")


def reward_checkpoint_wanted(args: CandidatesStageArgs) -> bool:
    if not args.suggest_with_reward:
        return False
    return bool(args.reward_dir) or (runs.stage_dir(args.run, "reward") / runs.MANIFEST).is_file()


def rank_by_score(scores: list[float]) -> list[int]:
    """Rank 1 = highest score; equal scores share a rank (standard competition ranking)."""
    return [1 + sum(other > score for other in scores) for score in scores]


def load_scorer(args):
    """The reward model that suggests rankings (None when there is none or it is not wanted)."""
    if not reward_checkpoint_wanted(args):
        return None
    from align import scoring

    return scoring.load_reward_checkpoint(args.run, args.reward_gate_policy, explicit=args.reward_dir)


def score_candidates(args, scorer, prompts, samples) -> tuple[list[list[float]], object]:
    flat_prompts = [record["prompt"] for record, group in zip(prompts, samples) for _ in group]
    flat_texts = [sample.text for group in samples for sample in group]
    flat = scorer.score(flat_prompts, flat_texts, progress="reward scores")
    return [flat[i * args.k : (i + 1) * args.k] for i in range(len(prompts))], scorer.checkpoint


def main(argv=None):
    (args,) = parse_stage_config("candidates", (CandidatesStageArgs,), argv)
    check_args(args)
    settings = generation.SamplingSettings(n=args.k, temperature=args.temperature, top_p=args.top_p,
                                           max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = data.load_prompts(args.prompts_file)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    sft = runs.find_checkpoint(args.run, ["sft"], args.sft_dir)
    dataset_name = args.argilla_dataset or f"{args.run}-candidates"

    client = None
    if args.push:  # before sampling: a missing server should cost seconds, not minutes
        from align import argilla_io

        client = argilla_io.connect()
    scorer = load_scorer(args)  # before sampling: a reward model it cannot use should cost seconds too

    with runs.stage_output(args.run, "candidates", resolved_config(args), args.seed, parent=sft) as out:
        out.add_input(args.prompts_file, "prompts", len(prompts))
        started = time.perf_counter()
        with cost.phase("generate"), generation.create_generator(
                sft.model_path, args.generation_backend, args.generation_dtype, server_url=args.server_url,
                kv_cache_gib=args.kv_cache_gib, seed=args.seed) as generator:  # engine start-up included
            backend, generation_dtype = generator.describe(), getattr(generator, "dtype", None)
            samples = generator.generate([record["prompt"] for record in prompts], settings, progress=True)
        sampling_s = time.perf_counter() - started
        tokens = sum(len(sample.token_ids) for group in samples for sample in group)
        print(f"[candidates] sampled {len(prompts)} x {args.k} candidates ({tokens} tokens) in {sampling_s:.1f} s "
              f"= {tokens / sampling_s:.0f} tokens/s with {backend}", flush=True)

        scores, reward, scoring_s = None, None, 0.0
        if scorer is not None:
            started = time.perf_counter()
            with cost.phase("score"):
                scores, reward = score_candidates(args, scorer, prompts, samples)
            scoring_s = time.perf_counter() - started
            print(f"[candidates] reward-model suggestions from {reward.folder} in {scoring_s:.1f} s", flush=True)
            out.set(reward_model=reward.as_parent())

        checkpoint_name = str(sft.folder)
        records = []
        for index, (record, group) in enumerate(zip(prompts, samples)):
            candidates = [{"text": sample.text, "finish_reason": sample.finish_reason, "tokens": len(sample.token_ids),
                           "logprob": round(sum(sample.logprobs), 4)} for sample in group]
            if scores is not None:
                for candidate, score in zip(candidates, scores[index]):
                    candidate["reward"] = score
            suggested = rank_by_score(scores[index]) if scores is not None else None
            records.append({"prompt_id": record["prompt_id"], "prompt": record["prompt"], "candidates": candidates,
                            "suggested_ranking": suggested})
        files.write_jsonl(out.path / "candidates.jsonl", records)

        empty = sum(not candidate["text"].strip() for record in records for candidate in record["candidates"])
        if empty:
            warn(f"{empty} candidates are empty (the model stopped at once); annotators see {EMPTY_PLACEHOLDER!r}")
        truncated = sum(sample.finish_reason == "length" for group in samples for sample in group)

        push_s, pushed = 0.0, 0
        if args.push:
            pushed, push_s = push_to_argilla(client, args, dataset_name, records, checkpoint_name)
            print(f"[candidates] pushed {pushed} records to Argilla dataset {args.argilla_workspace}/{dataset_name} "
                  f"in {push_s:.1f} s", flush=True)

        out.set(
            outputs={"candidates": "candidates.jsonl"},
            argilla={"dataset": dataset_name, "workspace": args.argilla_workspace, "pushed": args.push,
                     "records": pushed},
            sampling=generation.settings_dict(settings),
            generation={"backend": backend, "model": sft.model_path},
        )
        out.metrics.update(
            prompts=len(prompts), candidates=len(prompts) * args.k, tokens=tokens, sampling_s=round(sampling_s, 2),
            tokens_per_s=round(tokens / sampling_s, 1), truncated=truncated, empty=empty,
            scoring_s=round(scoring_s, 2), push_s=round(push_s, 2), suggested=scores is not None,
            cost=cost.report(generation_dtype or hardware.torch_dtype_name(args.generation_dtype),
                             phase_dtypes={"score": scorer.dtype} if scorer else None),
        )
    where = f"Argilla {args.argilla_workspace}/{dataset_name}" if args.push else "not pushed (--push false)"
    summary("candidates", prompts=len(prompts), k=args.k, sampling_s=f"{sampling_s:.1f}", push_s=f"{push_s:.1f}",
            truncated=f"{truncated}/{len(prompts) * args.k}", argilla=where,
            compute=cost.summary_text(out.metrics["cost"]), output=str(out.path))


def push_to_argilla(client, args, dataset_name: str, records: list[dict], checkpoint: str) -> tuple[int, float]:
    from align import argilla_io

    started = time.perf_counter()
    guidelines = Path(args.guidelines_file).read_text() if args.guidelines_file else None
    metadata = {"checkpoint": checkpoint, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens}
    items = [
        {
            "prompt_id": record["prompt_id"],
            "prompt": record["prompt"],
            "candidates": [c["text"] if c["text"].strip() else EMPTY_PLACEHOLDER for c in record["candidates"]],
            "metadata": metadata,
            "suggested_ranking": record["suggested_ranking"],
        }
        for record in records
    ]

    def push() -> list[str]:  # the dataset and its records, asked again if the server drops out
        dataset = argilla_io.create_ranking_dataset(client, dataset_name, args.argilla_workspace, args.k, guidelines,
                                                    args.min_submitted)
        return argilla_io.push_candidates(dataset, items)

    ids = argilla_io.retrying(f"pushing {len(items)} records to {args.argilla_workspace}/{dataset_name}",
                              client.api_url, push)
    return len(ids), time.perf_counter() - started


if __name__ == "__main__":
    run_stage(main, single_process="one vLLM engine samples, and it pushes to Argilla once")
