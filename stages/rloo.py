"""RLOO: align the SFT model with the reward model by REINFORCE leave-one-out (TRL's RLOOTrainer).

The control for PPO: TRL 1.16's own trainer, where PPO is written by hand (align/ppo_math.py),
so "which algorithm should I pick?" has a measured answer (bench/bench_policy.py).

Consumes
    - runs/<run>/sft: the policy to train AND the reference (LoRA: the adapter-disabled
      model is the reference, no second copy of the weights)
    - runs/<run>/reward: the reward model (its quality gate is checked: reward_gate_policy),
      called as a Python reward function in the layout it was trained on (align/rloo.py: why
      not TRL's own loading of the folder)
    - `ranked_files`: only their prompts are used, as train prompts (held-out ones removed)
    - `eval_file`: held-out prompts, never trained on: SFT vs RLOO is judged there

Produces runs/<run>/rloo/: model/ (merged, Hugging Face format), adapter/ (LoRA),
samples/eval_{sft,rloo}.jsonl (held-out samples with reward and house-style scores),
rollouts/rollouts.jsonl (every scored training sample), logs/ (stage.log, steps.jsonl with
TRL's metrics per step, and per `report_to` tensorboard/ and/or wandb/), config.yaml,
manifest.json (parent: the SFT stage; reward_model: the reward stage).

One step (TRL's RLOO): `per_device_train_batch_size x gradient_accumulation_steps /
num_generations` prompts per process (sampled at once, trained in micro-batches), each sampled
`num_generations` times through align.generation (vLLM where the probe measured it faster;
the policy's weights pushed after every optimiser step); rewards from the reward model, a cut
answer `truncation_penalty` lower; minus beta x the sequence's k1 KL to the reference;
each sample's baseline is the mean reward of the other samples of its prompt; the clipped
surrogate over the group. Keys: TRL's RLOOConfig (`num_generations`, `beta`,
`max_completion_length`, `learning_rate`, `max_steps`, ...).

Before and after training it samples the SFT model and the RLOO model on the held-out
prompts with the same decoding and seed, and judges them with the statistics of
`make compare` (align.online.HeldOut), as the DPO and PPO stages do.

Several processes (torchrun / accelerate launch): every rank trains its share of each batch under
DDP; rank 0 alone holds the generator and the reward model, samples every rank's prompts of a
step in one call and scores every rank's answers (align/rloo.py), samples the held-out prompts
and writes the stage folder (README "Many GPUs").

Up to date (same config, SFT and reward parents, data, code and versions as the finished
runs/<run>/rloo): one line, nothing retrained; `--force` redoes it (align/runs.py).
Interrupted (SIGTERM, kill -9): the same command resumes from the trainer's last checkpoint
(every `save_steps`, and at SIGTERM) in runs/<run>/.rloo.resume/ (align/resume.py).

Run: make rloo [RUN=name] [ARGS="--max_steps 16 --beta 0.1 ..."]
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from datasets import Dataset
from trl import ModelConfig, RLOOConfig

from align import data, files, hardware, online, preferences, processes, resume, rloo, runs, trackers, training
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn_skipped
from align.errors import ConfigError
from align.hardware import Precision
from align.model_card import write_model_card

PHASES = ("generate", "score", "train", "sync", "eval")


@dataclass
class RLOOStageArgs:
    run: str = field(default="default", metadata={"help": "run name: parents runs/<run>/{sft,reward}, output runs/<run>/rloo"})
    sft_dir: str | None = field(default=None, metadata={"help": "an explicit SFT stage folder instead of runs/<run>/sft"})
    reward_dir: str | None = field(default=None, metadata={"help": "an explicit reward stage folder"})
    reward_gate_policy: runs.GatePolicy = field(default="warn", metadata={"help": "reward model failed its gate: warn | refuse"})
    ranked_files: list[str] = field(default_factory=lambda: ["data/ranked.jsonl"],
                                    metadata={"help": "ranked responses: only their prompts are used (train prompts)"})
    precision: Precision = field(default="auto", metadata={"help": "training autocast: auto | bf16 | fp32"})
    # held-out evaluation and sampling: align.online.HeldOutArgs, GenerationArgs (shared with DPO and PPO)
    lora_top_layers: int | None = training.lora_top_layers_field(default=None)


def check_args(config: RLOOConfig) -> None:
    """What a type cannot say, and TRL settings this stage does not apply (its sampler is ours)."""
    if config.use_vllm:
        raise ConfigError("use_vllm: the RLOO stage samples through generation_backend (auto | vllm | hf | openai), "
                          "not TRL's vLLM; set generation_backend instead")
    if config.num_generations is None or config.num_generations < 2:
        raise ConfigError(f"num_generations: RLOO's baseline needs >= 2 samples per prompt, got {config.num_generations}")
    if not config.max_completion_length or config.max_completion_length < 1:
        raise ConfigError(f"max_completion_length: must be >= 1, got {config.max_completion_length}")
    if config.temperature <= 0:
        raise ConfigError(f"temperature: RLOO samples the policy, must be > 0, got {config.temperature}")
    ignored = {"top_k": (config.top_k, (0, None)), "min_p": (config.min_p, (None, 0.0)),
               "repetition_penalty": (config.repetition_penalty, (1.0,)),
               "generation_kwargs": (config.generation_kwargs, (None, {}))}
    for key, (value, defaults) in ignored.items():
        if value not in defaults:
            raise ConfigError(f"{key}: not applied by align's sampler (temperature and top_p are); remove it")
    if config.beta < 0:
        raise ConfigError(f"beta: must be >= 0, got {config.beta}")


def main(argv=None):
    parsed = parse_stage_config(
        "rloo", (RLOOStageArgs, online.HeldOutArgs, online.GenerationArgs, ModelConfig, RLOOConfig), argv)
    args, heldout_args, sampler, model_args, rloo_config = parsed
    check_args(rloo_config)
    tracker_names = trackers.requested_trackers(rloo_config.report_to)

    # Inputs, parents and the reward model, all checked before the policy loads.
    heldout = heldout_args.heldout("rloo")
    records = [record for path in args.ranked_files for record in data.load_ranked(path)]
    prompts = preferences.train_prompts(records, heldout.records, args.ranked_files)
    config = resolved_config(args, heldout_args, sampler, model_args, rloo_config)
    sft, fingerprint = online.policy_parents("rloo", args, config, [*args.ranked_files, heldout_args.eval_file])
    if runs.skip_if_up_to_date(args.run, "rloo", config, fingerprint, parsed.force):
        return
    warn_skipped(heldout.skipped)  # after the up-to-date check: a skipped stage stays quiet
    bf16 = hardware.use_bf16(args.precision)
    # Several processes: rank 0 alone samples and scores (every rank's rollouts, and the held-out
    # prompts); the others train their share of each batch under DDP.
    samples_here = processes.current().is_main
    scorer = sampler.scorer(args.run, args.reward_gate_policy, args.reward_dir, bf16) if samples_here else None
    # the reference: TRL's own (adapter disabled, or its frozen copy); ours for the held-out KL
    tokenizer, policy, peft_config, reference = online.load_policy(sft, model_args, args.lora_top_layers)

    with runs.stage_output(args.run, "rloo", config, rloo_config.seed, parent=sft, fingerprint=fingerprint) as out:
        started = time.time()
        if scorer is not None:
            out.set(reward_model=scorer.checkpoint.as_parent())
        for path in args.ranked_files:
            out.add_input(path, "ranked")
        out.add_input(heldout_args.eval_file, "eval prompts", len(heldout.records))
        checkpoints = resume.TrainerCheckpoints(out, fingerprint, parsed.force)
        with trackers.open_trackers(tracker_names, out, config, trainer_writes_tensorboard=True) as tracked:
            trainer_args = training.fit_to_hardware(rloo_config, args.precision, out.path, checkpoints.folder)
            training.record_effective_batch(out, trainer_args)
            timer = online.PhaseTimer(PHASES)
            engine = sampler.generator(sft.model_path, seed=rloo_config.seed) if samples_here else contextlib.nullcontext()
            with engine as generator:
                if samples_here:
                    with timer.phase("eval"):
                        sft_eval = heldout.sample_sft(generator, scorer, sft, out.say)
                reward_function = rloo.RewardModelFunction(scorer, tokenizer.eos_token_id, heldout.truncation_penalty,
                                                           timer)
                trainer = rloo.generator_rloo_trainer(generator, timer, rloo_config.seed)(
                    model=policy, reward_funcs=reward_function, args=trainer_args,
                    train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
                    processing_class=tokenizer, peft_config=peft_config)
                per_step = trainer_args.per_device_train_batch_size * trainer_args.gradient_accumulation_steps
                out.say(f"[rloo] {trainer_args.max_steps} steps x {per_step} samples per process "
                        f"({per_step // rloo_config.num_generations} prompts x {rloo_config.num_generations}, in "
                        f"micro-batches of {trainer_args.per_device_train_batch_size}), {len(prompts)} train prompts, "
                        f"{len(heldout.records)} "
                        f"held-out prompts; reference = "
                        f"{'the adapter-disabled SFT model' if peft_config else 'a frozen copy'}")
                result = timed_training(timer, lambda: checkpoints.train(trainer))
                if not samples_here:  # another rank: its share is trained; rank 0 evaluates and saves
                    training.save_trained(trainer, tokenizer, out, peft_config is not None)
                    return
                with timer.phase("sync"):
                    generator.update_weights(trainer.model)
                with timer.phase("eval"):
                    rloo_eval, kl = heldout.sample_policy(generator, scorer, "RLOO", trainer.model, tokenizer,
                                                        heldout_args.kl_estimator, reference_model=reference)
                backend = generator.describe()
            verdict = heldout.verdict("rloo", sft_eval, rloo_eval, kl)
            tracked.log("heldout_sft", sft_eval.summary(), 0)
            tracked.log("heldout_rloo", rloo_eval.summary(), 0)

        files.write_jsonl(out.path / "samples" / "eval_sft.jsonl", sft_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.path / "samples" / "eval_rloo.jsonl", rloo_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.path / "rollouts" / "rollouts.jsonl", reward_function.rollouts)
        steps = rloo.step_rows(trainer.state.log_history)
        files.write_jsonl(out.logs_dir / "steps.jsonl", steps)
        training.save_trained(trainer, tokenizer, out, peft_config is not None)
        out.set(generation_backend=backend)
        out.metrics.update(**online.heldout_metrics("rloo", heldout, sft_eval, rloo_eval, heldout_args.kl_estimator,
                                                    verdict),
                           **run_metrics(steps), train_steps=result.global_step, bf16=trainer_args.bf16,
                           sampled_responses=len(reward_function.rollouts), **timer.as_metrics(),
                           total_s=round(time.time() - started, 1),
                           cost=online.cost_report(timer, trainer_args.bf16, generator, scorer))
        write_model_card(out.model_dir, out.manifest)  # inside the temporary folder: a crashed stage has no card
    checkpoints.finish()
    m = out.metrics
    summary("rloo", steps=result.global_step, **online.summary_fields("rloo", m, PHASES), output=str(out.path))
    print(verdict["verdict_line"], flush=True)


def timed_training(timer: online.PhaseTimer, train):
    """Run `train` under the "train" phase, minus the generate / score / sync time spent inside it
    (the trainer calls back into the sampler and the reward function)."""
    inner = ("generate", "score", "sync")
    before = {name: timer.totals.get(name, 0.0) for name in inner}
    with timer.phase("train"):
        result = train()
    timer.totals["train"] -= sum(timer.totals.get(name, 0.0) - before[name] for name in inner)
    return result


def run_metrics(steps: list[dict]) -> dict:
    """The run's RLOO numbers for the manifest, from TRL's logged steps (first and last)."""
    if not steps:
        return {}
    first, last = steps[0], steps[-1]
    picked = {"reward": "rollout_reward", "kl": "rollout_kl", "completions/mean_length": "rollout_length",
              "completions/clipped_ratio": "rollout_cut_fraction", "entropy": "rollout_entropy"}
    metrics = {}
    for key, name in picked.items():
        if key in first:
            metrics[f"{name}_first"], metrics[f"{name}_last"] = first[key], last[key]
    metrics["clip_ratio_mean"] = (sum(row.get("clip_ratio/region_mean", 0.0) for row in steps) / len(steps))
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_stage(main)
