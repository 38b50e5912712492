"""PPO: align the SFT model with the reward model by proximal policy optimisation, on-policy.

Hand-written: TRL 1.16 ships no PPO (removed in 1.13); the math is align/ppo_math.py
(checked against TRL 1.12), the models around it align/ppo.py.

Consumes
    - runs/<run>/sft: the policy to train AND the reference (LoRA: the adapter-disabled
      model is the reference, no second copy of the weights)
    - runs/<run>/reward: the reward model (its quality gate is checked: reward_gate_policy),
      which also initialises the critic (its own LoRA, score head trained in full)
    - `ranked_files`: only their prompts are used, as train prompts (held-out ones removed)
    - `eval_file`: held-out prompts, never trained on: SFT vs PPO is judged there

Produces runs/<run>/ppo/: model/ (merged, Hugging Face format), adapter/ (LoRA),
samples/eval_{sft,ppo}.jsonl (held-out samples with reward and house-style scores),
rollouts/update-<n>-samples.jsonl, logs/ (stage.log, updates.jsonl one row per update,
steps.jsonl one row per minibatch step, push_check.jsonl, and per `report_to` tensorboard/
and/or wandb/), config.yaml,
manifest.json (parent: the SFT stage; reward_model: the reward stage).

One update (design notes §2.2): sample `prompts_per_update` x `samples_per_prompt` answers
from the current policy (align.generation; vLLM where it is faster); score them with the
reward model, an answer cut at max_new_tokens `truncation_penalty` lower (PPO's
missing-eos penalty: align.scoring.effective_reward); recompute old log-probs, reference
log-probs and values in torch (never vLLM's); KL-shaped rewards, GAE (the critic's targets
at their own `critic_lam`), whitened advantages; K epochs x M minibatches of the clipped
policy loss and the value loss (clipped if `cliprange_value` is set; the first
`critic_warmup_updates` train the critic only); after each update that trained the policy,
push the weights into the generator and check its greedy output against the policy's.

Before and after training it samples the SFT model and the PPO model on the held-out
prompts with the same decoding and seed, and judges them with the statistics of
`make compare` (align.online.HeldOut), as the DPO stage does.

Several processes (torchrun --nproc_per_node N): rank 0 alone samples and scores each update's
rollouts (one engine, as on-policy DPO and RLOO) and sends them to every rank; the forward passes
and each minibatch's forward and backward passes are split by rows across ranks, the gradients
summed (align/processes.py), so every rank steps the same weights and the run is the
single-process run on the same global batch (tests/test_distributed.py). Rank 0 pushes the weights,
evaluates and saves.

Up to date (same config, SFT and reward parents, data, code and versions as the finished
runs/<run>/ppo): one line, nothing retrained; `--force` redoes it (align/runs.py).
Interrupted (SIGTERM, kill -9): the same command goes on after the last finished update,
checkpointed in runs/<run>/.ppo.resume/ (align/resume.py).

Run: make ppo [RUN=name] [ARGS="--updates 4 --kl_coef 0.1 ..."]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Literal

from trl import ModelConfig

from align import (data, files, hardware, models, online, ppo, ppo_math, preferences, processes, resume, runs, trackers,
                   training)
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn, warn_skipped
from align.errors import ConfigError
from align.generation import SamplingSettings, render_prompts
from align.hardware import Precision
from align.model_card import write_model_card

PHASES = ("generate", "score", "forward", "train", "sync", "eval")


@dataclass
class PPOStageArgs:
    run: str = field(default="default", metadata={"help": "run name: parents runs/<run>/{sft,reward}, output runs/<run>/ppo"})
    sft_dir: str | None = field(default=None, metadata={"help": "an explicit SFT stage folder instead of runs/<run>/sft"})
    reward_dir: str | None = field(default=None, metadata={"help": "an explicit reward stage folder"})
    reward_gate_policy: runs.GatePolicy = field(default="warn", metadata={"help": "reward model failed its gate: warn | refuse"})
    ranked_files: list[str] = field(default_factory=lambda: ["data/ranked.jsonl"],
                                    metadata={"help": "ranked responses: only their prompts are used (train prompts)"})
    precision: Precision = field(default="auto", metadata={"help": "training autocast: auto | bf16 | fp32"})
    seed: int = field(default=42, metadata={"help": "LoRA init, prompt order, minibatch order, rollout sampling"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "trackers of the updates: tensorboard | wandb (several allowed) | none (align/trackers.py); "
                "the same key as the trainer stages' TrainingArguments"})
    # rollouts
    updates: int = field(default=8, metadata={"help": "PPO updates (rollout batches)"})
    prompts_per_update: int = field(default=32, metadata={"help": "train prompts sampled per update"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers per prompt (PPO needs no groups)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature; every log-prob uses z / temperature"})
    max_new_tokens: int = field(default=128, metadata={"help": "rollout answer cap; a cut answer scores truncation_penalty lower"})
    # the update (names as TRL 1.12's PPOConfig)
    num_ppo_epochs: int = field(default=2, metadata={"help": "K: epochs over each rollout batch"})
    num_mini_batches: int = field(default=2, metadata={"help": "M: optimiser steps per epoch"})
    micro_batch_size: int = field(default=8, metadata={"help": "rows per forward/backward (gradients accumulate)"})
    forward_batch_size: int = field(default=8, metadata={"help": "rows per no-grad forward (old, reference, values)"})
    cliprange: float = field(default=0.2, metadata={"help": "epsilon of the clipped policy ratio"})
    cliprange_value: float | None = field(default=None, metadata={
        "help": "epsilon of the clipped value loss: no gradient beyond this far from the old value; null: no clipping"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight (TRL parity; the critic lr is the real knob)"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    critic_lam: float | None = field(default=1.0, metadata={
        "help": "GAE lambda of the critic's targets (decoupled GAE, VC-PPO); 1.0: reward-to-go; null: lam"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta of the per-token KL penalty in the reward"})
    kl_penalty_estimator: ppo_math.KLEstimator = field(default="k1", metadata={"help": "k1 | k2 | k3 in the reward"})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive beta towards this KL (null: fixed beta)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive beta horizon, in episodes"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the shaped rewards (mean kept)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "policy AdamW lr (constant, eps 1e-5)"})
    critic_learning_rate: float = field(default=3e-4, metadata={"help": "critic AdamW lr (constant, eps 1e-5)"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping, policy and critic apart"})
    dual_clip: float | None = field(default=None, metadata={"help": "dual-clip bound for negative advantages (> 1)"})
    critic_warmup_updates: int = field(default=1, metadata={"help": "first N updates train the critic only"})
    critic_lora_top_layers: int | None = training.lora_top_layers_field(default=8, subject="critic LoRA")
    tis: Literal["off", "truncate", "mask"] = field(default="off", metadata={
        "help": "truncated importance sampling against the sampler's logprobs: off | truncate | mask"})
    tis_cap: float = field(default=3.0, metadata={"help": "TIS cap"})
    push_check_prompts: int = field(default=2, metadata={
        "help": "after each push, compare the generator's greedy answers with the policy's on N held-out prompts"})
    push_check_tokens: int = field(default=16, metadata={"help": "tokens per push-check answer"})
    # held-out evaluation and sampling: align.online.HeldOutArgs, GenerationArgs (shared with DPO)
    lora_top_layers: int | None = training.lora_top_layers_field(default=None, subject="policy LoRA")


def check_args(args: PPOStageArgs) -> None:
    """What a type cannot say (choices are Literal types, checked by the parser)."""
    for key in ("updates", "prompts_per_update", "samples_per_prompt", "max_new_tokens", "num_ppo_epochs",
                "num_mini_batches", "micro_batch_size", "forward_batch_size",
                "push_check_tokens"):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(args, key)}")
    if args.prompts_per_update * args.samples_per_prompt < max(2, args.num_mini_batches):
        raise ConfigError(f"prompts_per_update x samples_per_prompt: must fill {args.num_mini_batches} minibatches "
                          "and give >= 2 rollouts (advantage whitening)")
    if args.temperature <= 0:
        raise ConfigError(f"temperature: PPO samples the policy, must be > 0, got {args.temperature}")
    if args.tis != "off" and args.temperature != 1.0:
        raise ConfigError("tis: the sampler's logprobs are raw (before temperature); TIS needs temperature 1.0")
    if args.dual_clip is not None and args.dual_clip <= 1:
        raise ConfigError(f"dual_clip: must be > 1, got {args.dual_clip}")
    for key in ("cliprange", "cliprange_value", "learning_rate", "critic_learning_rate", "tis_cap"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(args, key)}")
    if args.kl_coef < 0 or not 0 <= args.gamma <= 1 or not 0 <= args.lam <= 1:
        raise ConfigError("kl_coef must be >= 0, gamma and lam in [0, 1]")
    if not 0 <= args.critic_warmup_updates < args.updates:
        raise ConfigError(f"critic_warmup_updates: must be >= 0 and below updates ({args.updates}), got "
                          f"{args.critic_warmup_updates}: the first N updates train the critic only")
    if args.critic_lam is not None and not 0 <= args.critic_lam <= 1:
        raise ConfigError(f"critic_lam: must be in [0, 1] (or null: lam), got {args.critic_lam}")
    if args.kl_target is not None and (args.kl_target <= 0 or args.kl_horizon <= 0):
        raise ConfigError("kl_target and kl_horizon: must be > 0 for the adaptive KL coefficient")


def load_train_prompts(args: PPOStageArgs, heldout: list[dict]) -> list[list[dict]]:
    """The distinct prompts of the ranked data, minus any that are also held out (validated before models load)."""
    records = [record for path in args.ranked_files for record in data.load_ranked(path)]
    return preferences.train_prompts(records, heldout, args.ranked_files)


def check_same_tokenizer(sft: runs.Checkpoint, reward: runs.Checkpoint) -> None:
    """The critic reads the policy's token ids: policy and reward model must share the chat template."""
    ours, theirs = sft.manifest.get("chat_template_sha256"), reward.manifest.get("chat_template_sha256")
    if ours and theirs and ours != theirs:
        raise ConfigError(f"{reward.folder}: chat template differs from {sft.folder}'s; the critic reads the policy's "
                          "tokens, so both must come from the same tokenizer")


def main(argv=None):
    import torch

    parsed = parse_stage_config("ppo", (PPOStageArgs, online.HeldOutArgs, online.GenerationArgs, ModelConfig), argv)
    args, heldout_args, sampler, model_args = parsed
    check_args(args)
    refuse_sharding_launch()
    tracker_names = trackers.requested_trackers(args.report_to)

    # Inputs, parents and the reward model, all checked before the policy loads.
    heldout = heldout_args.heldout("ppo")
    prompts = load_train_prompts(args, heldout.records)
    config = resolved_config(args, heldout_args, sampler, model_args)
    sft, fingerprint = online.policy_parents("ppo", args, config, [*args.ranked_files, heldout_args.eval_file])
    if runs.skip_if_up_to_date(args.run, "ppo", config, fingerprint, parsed.force):
        return
    warn_skipped(heldout.skipped)  # after the up-to-date check: a skipped stage stays quiet
    bf16 = hardware.use_bf16(args.precision)
    # Several processes: rank 0 alone samples and scores; every rank trains its share of the rows.
    me = processes.current()
    samples_here = me.is_main
    check_world_size(args, me.world_size)
    scorer = sampler.scorer(args.run, args.reward_gate_policy, args.reward_dir, bf16) if samples_here else None
    reward = scorer.checkpoint if scorer is not None else runs.find_checkpoint(args.run, ["reward"], args.reward_dir)
    check_same_tokenizer(sft, reward)

    torch.manual_seed(args.seed)  # LoRA A matrices
    tokenizer = models.load_tokenizer(sft.model_path)
    peft_config = training.lora_config(model_args, args.lora_top_layers, sft.model_path)
    policy = models.load_causal_lm(sft.model_path)
    reference = None if peft_config else models.load_causal_lm(sft.model_path).eval()
    if peft_config is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config)  # LoRA B = 0: at update 1 policy = reference exactly
    critic_args = dataclasses.replace(model_args, lora_task_type="SEQ_CLS", lora_modules_to_save=["score"])
    critic = ppo.load_critic(reward.model_path, training.lora_config(
        critic_args, args.critic_lora_top_layers, reward.model_path))
    updater = ppo.PPOUpdater(policy, critic, update_settings(args), args.learning_rate, args.critic_learning_rate,
                             seed=args.seed, autocast_bf16=bf16)

    with runs.stage_output(args.run, "ppo", config, args.seed, parent=sft, fingerprint=fingerprint) as out:
        started = time.time()
        out.set(reward_model=reward.as_parent())
        record_effective_batch(out, args)
        for path in args.ranked_files:
            out.add_input(path, "ranked")
        out.add_input(heldout_args.eval_file, "eval prompts", len(heldout.records))
        with trackers.open_trackers(tracker_names, out, config) as tracked:
            timer = online.PhaseTimer(PHASES)
            out.say(f"[ppo] {args.updates} updates x {args.prompts_per_update * args.samples_per_prompt} rollouts, "
                    f"{len(prompts)} train prompts, {len(heldout.records)} held-out prompts; reference = "
                    f"{'the adapter-disabled SFT model' if peft_config else 'a frozen copy of the SFT model'}; "
                    f"critic from {reward.model_path}")

            checkpoints = resume.UpdateCheckpoints(out, fingerprint, parsed.force)
            loop = UpdateLoop(args, policy, reference, critic, updater, tokenizer, scorer, prompts, heldout, timer,
                              tracked, out, bf16, checkpoints)
            engine = sampler.generator(sft.model_path, seed=args.seed) if samples_here else contextlib.nullcontext()
            with engine as generator:
                if samples_here:
                    with timer.phase("eval"):
                        sft_eval = heldout.sample_sft(generator, scorer, sft, out.say)
                update_rows = loop.run(generator)
                if not samples_here:  # another rank: its shares are trained; rank 0 evaluates and saves
                    return
                with timer.phase("eval"):
                    ppo_eval, kl = heldout.sample_policy(generator, scorer, "PPO", policy, tokenizer,
                                                       heldout_args.kl_estimator, reference_model=reference)
                backend = generator.describe()
            verdict = heldout.verdict("ppo", sft_eval, ppo_eval, kl)
            tracked.log("heldout_sft", sft_eval.summary(), 0)
            tracked.log("heldout_ppo", ppo_eval.summary(), 0)

        files.write_jsonl(out.path / "samples" / "eval_sft.jsonl", sft_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.path / "samples" / "eval_ppo.jsonl", ppo_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.logs_dir / "updates.jsonl", update_rows)
        files.write_jsonl(out.logs_dir / "steps.jsonl", loop.step_rows)
        files.write_jsonl(out.logs_dir / "push_check.jsonl", loop.push_checks)
        training.save_outputs(policy, tokenizer, out, peft_config is not None)
        out.set(generation_backend=backend)
        out.metrics.update(**online.heldout_metrics("ppo", heldout, sft_eval, ppo_eval, heldout_args.kl_estimator, verdict),
                           **run_metrics(update_rows), updates=update_rows, train_steps=updater.steps, bf16=bf16,
                           **timer.as_metrics(), total_s=round(time.time() - started, 1),
                           cost=online.cost_report(timer, bf16, generator, scorer))
        write_model_card(out.model_dir, out.manifest)  # inside the temporary folder: a crashed stage has no card
    checkpoints.finish()
    m = out.metrics
    summary("ppo", updates=f"{len(update_rows)} ({updater.steps} steps)", clipfrac=f"{m['clipfrac_mean']:.3f}",
            **online.summary_fields("ppo", m, timer.phases), output=str(out.path))
    print(verdict["verdict_line"], flush=True)


def refuse_sharding_launch() -> None:
    """PPO's update is hand-written plain data parallelism, not accelerate's: under a DeepSpeed or
    FSDP launch it would silently not shard, so that is refused before anything loads."""
    sharding = processes.sharding_launcher()
    if sharding:
        raise ConfigError(f"launched with a DeepSpeed/FSDP accelerate config ({sharding}=true), but PPO's hand-written "
                          "update is plain data parallelism and would not shard; use torchrun or "
                          "configs/accelerate/ddp.yaml")


def check_world_size(args: PPOStageArgs, world_size: int) -> None:
    """Every process needs rows in every minibatch (they split each one by rows)."""
    rows = args.prompts_per_update * args.samples_per_prompt // args.num_mini_batches
    if rows < world_size:
        raise ConfigError(f"prompts_per_update x samples_per_prompt / num_mini_batches: {rows} rollouts per minibatch "
                          f"cannot be split across {world_size} processes; raise prompts_per_update or lower "
                          "num_mini_batches")


def record_effective_batch(out, args: PPOStageArgs) -> None:
    """Manifest `world_size`, `effective_batch` (rollouts per update, whatever the world size) and
    `minibatch_rollouts`, and one line saying how a minibatch is split."""
    world_size = processes.current().world_size
    rollouts = args.prompts_per_update * args.samples_per_prompt
    minibatch = rollouts // args.num_mini_batches
    out.set(world_size=world_size, effective_batch=rollouts, minibatch_rollouts=minibatch)
    out.say(f"[ppo] effective batch {rollouts} rollouts per update, {args.num_mini_batches} minibatches of "
            f"{minibatch} = ~{minibatch / world_size:g} per process x {world_size} process{'es' * (world_size != 1)}")


def update_settings(args: PPOStageArgs) -> ppo.PPOSettings:
    return ppo.PPOSettings(
        num_ppo_epochs=args.num_ppo_epochs, num_mini_batches=args.num_mini_batches,
        micro_batch_size=args.micro_batch_size, cliprange=args.cliprange, cliprange_value=args.cliprange_value,
        vf_coef=args.vf_coef, max_grad_norm=args.max_grad_norm, temperature=args.temperature,
        dual_clip=args.dual_clip, tis=None if args.tis == "off" else args.tis, tis_cap=args.tis_cap)


def run_metrics(update_rows: list[dict]) -> dict:
    """The run's PPO numbers for the manifest: means over the updates that trained the policy
    (a critic warm-up's clip fraction is 0 by construction), first and last update."""
    first, last = update_rows[0], update_rows[-1]
    trained = [row for row in update_rows if not row.get("critic_warmup")]
    return {"clipfrac_mean": sum(r["policy/clipfrac_avg"] for r in trained) / len(trained),
            "approxkl_mean": sum(r["policy/approxkl_avg"] for r in trained) / len(trained),
            "rollout_score_first": first["objective/scores"], "rollout_score_last": last["objective/scores"],
            "rollout_kl_last": last["objective/kl"], "value_loss_first": first["loss/value_avg"],
            "value_loss_last": last["loss/value_avg"], "explained_variance_last": last["critic/vf_explained_var"]}


class UpdateLoop:
    """The updates: rollout -> score -> torch forwards -> rewards, GAE -> PPO epochs -> push."""

    def __init__(self, args, policy, reference, critic, updater, tokenizer, scorer, prompts, heldout, timer,
                 tracked, out, bf16, checkpoints):
        self.args, self.policy, self.reference, self.critic = args, policy, reference, critic
        self.checkpoints = checkpoints
        self.updater, self.tokenizer, self.scorer, self.prompts = updater, tokenizer, scorer, prompts
        self.heldout, self.timer, self.tracked, self.out, self.bf16 = heldout, timer, tracked, out, bf16
        self.kl_controller = (ppo_math.FixedKLController(args.kl_coef) if args.kl_target is None else
                              ppo_math.AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon))
        self.step_rows: list[dict] = []
        self.push_checks: list[dict] = []

    def autocast(self):
        import contextlib

        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def run(self, generator) -> list[dict]:
        """Every update, each checkpointed once done; an interrupted run's rerun goes on after its last."""
        rows, first = [], 0
        restored = self.checkpoints.restore(self.updater, self.out.path / "rollouts", self.args.updates)
        if restored is not None:
            rows, first = restored["rows"], restored["update"]
            self.step_rows, self.push_checks = restored["step_rows"], restored["push_checks"]
            self.kl_controller.value = restored["kl_coef"]
            for row in rows:
                self.tracked.log("update", row, row["update"], skip=("update",))
            if generator is not None:
                with self.timer.phase("sync"):
                    generator.update_weights(self.policy)  # the next update samples the restored policy
        for index in range(first, self.args.updates):
            started = time.perf_counter()
            row = self.one_update(generator, index)
            row["update_s"] = round(time.perf_counter() - started, 2)
            row.update(self.timer.as_metrics())  # cumulative seconds per phase after this update
            rows.append(row)
            self.out.say(f"[ppo] update {index + 1}/{self.args.updates}: score {row['objective/scores']:.3f}, "
                         f"KL {row['objective/kl']:.3f}, clipfrac {row['policy/clipfrac_avg']:.3f}, "
                         f"value loss {row['loss/value_avg']:.4f}, explained var {row['critic/vf_explained_var']:.2f}, "
                         f"length {row['response/length_mean']:.1f}, {row['update_s']:.1f} s"
                         f"{' (critic warm-up: policy unchanged)' if row['critic_warmup'] else ''}")
            self.tracked.log("update", row, index + 1, skip=("update",))
            self.checkpoints.save_update(index + 1, self.updater, {
                "rows": rows, "step_rows": self.step_rows, "push_checks": self.push_checks,
                "kl_coef": self.kl_controller.value}, sorted((self.out.path / "rollouts").glob("*.jsonl")))
        return rows

    def one_update(self, generator, index: int) -> dict:
        import torch

        args, number = self.args, index + 1
        warmup = index < args.critic_warmup_updates  # the critic only: the policy stays as it is
        settings = SamplingSettings(n=args.samples_per_prompt, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, seed=online.round_seed(args.seed, index))
        round_set = online.round_prompts(self.prompts, index, args.prompts_per_update, args.seed)
        fresh = None
        if generator is not None:  # rank 0 (every process in a single-process run)
            fresh = online.sample_and_score(generator, self.scorer, round_set, settings, self.timer,
                                            progress=f"update {number}/{args.updates}",
                                            truncation_penalty=self.heldout.truncation_penalty)
            files.write_jsonl(self.out.path / "rollouts" / f"update-{number}-samples.jsonl", fresh.records())
        fresh = processes.from_main(fresh)  # the same rollouts on every rank
        flat = list(fresh.flat())
        samples = [sample for _, sample, _, _ in flat]
        scores = torch.tensor([score for _, _, score, _ in flat])  # the truncation penalty already applied
        raw_scores = torch.tensor([raw for group in fresh.model_scores for raw in group])

        with self.timer.phase("forward"):
            batch = ppo.RolloutBatch.from_samples(self.tokenizer, [prompt for prompt, _, _, _ in flat], samples)
            size = args.forward_batch_size
            share = batch.rows(processes.my_rows(len(batch)))  # this rank's rows; all of them in one process
            with self.autocast():
                old_logp = ppo.token_logprobs(self.policy, share, args.temperature, size)
                if self.reference is not None:
                    ref_logp = ppo.token_logprobs(self.reference, share, args.temperature, size)
                else:
                    from align.logprobs import adapters_disabled

                    with adapters_disabled(self.policy):
                        ref_logp = ppo.token_logprobs(self.policy, share, args.temperature, size)
                old_values = ppo.critic_values(self.critic, share, size)
            old_logp, ref_logp, old_values = map(processes.gather_rows, (old_logp, ref_logp, old_values))

        with self.timer.phase("train"):
            beta = self.kl_controller.value
            mask = batch.mask
            kl = ppo_math.kl_per_token(old_logp, ref_logp, args.kl_penalty_estimator)
            rewards = ppo_math.shape_rewards(scores, kl, mask, beta)
            if args.whiten_rewards:
                rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
            raw_advantages, returns = ppo_math.decoupled_gae(rewards, old_values, mask, args.gamma, args.lam,
                                                             args.critic_lam)
            advantages = ppo_math.masked_whiten(raw_advantages, mask)
            steps = self.updater.update(batch, old_logp, old_values, advantages, returns, train_policy=not warmup)
        for step in steps:
            self.step_rows.append({"update": number, "step": len(self.step_rows) + 1, **step})

        sync_s = agreement = None
        # a critic warm-up leaves the policy as it was: nothing to push
        if generator is not None and not warmup:  # rank 0's engine; the other ranks hold the same weights already
            with self.timer.phase("sync"):
                sync_s = generator.update_weights(self.policy)
                agreement = self.check_push(generator, number)

        row = {"update": number, "episode": number * len(batch), "critic_warmup": warmup, **ppo.mean_rows(steps)}
        row.update(rollout_metrics(batch, scores, raw_scores, old_logp, ref_logp, kl, beta, old_values, returns,
                                   raw_advantages, args.temperature))
        row.update({"kl_coef": beta, "lr/policy": args.learning_rate, "lr/critic": args.critic_learning_rate,
                    "sync_s": sync_s, "sync/greedy_agreement": agreement,
                    "policy/first_ratio": steps[0]["val/ratio"],
                    "policy/first_clipfrac": steps[0]["policy/clipfrac_avg"],
                    "fresh_style_score": fresh.summary()["style_score"]})
        self.kl_controller.update(row["objective/kl"], len(batch))
        return row

    def check_push(self, generator, number: int) -> float | None:
        """P15: a stale engine silently samples the old policy. Greedy answers of the generator
        and of the policy itself on a few held-out prompts; the share that agree token for token."""
        count = min(self.args.push_check_prompts, len(self.heldout.records))
        if count == 0:
            return None
        conversations = self.heldout.prompts[:count]
        engine = generator.generate(conversations, SamplingSettings(temperature=0.0,
                                                                     max_new_tokens=self.args.push_check_tokens))
        with self.autocast():
            policy = ppo.greedy_ids(self.policy, render_prompts(self.tokenizer, conversations),
                                    self.args.push_check_tokens, self.tokenizer.eos_token_id)
        agree = [group[0].token_ids == ids for group, ids in zip(engine, policy)]
        self.push_checks.extend({"update": number, "prompt": conversation, "generator_ids": group[0].token_ids,
                                 "policy_ids": ids} for conversation, group, ids in zip(conversations, engine, policy))
        if not all(agree):
            warn(f"update {number}: the generator's greedy answers differ from the policy's on "
                 f"{agree.count(False)} of {count} prompts after the weight push (bf16 generation can differ "
                 "slightly; identical weights in fp32 must not): see logs/push_check.jsonl")
        return sum(agree) / count


def rollout_metrics(batch, scores, raw_scores, old_logp, ref_logp, kl, beta, old_values, returns, raw_advantages,
                    temperature) -> dict:
    """Brief §4's per-update numbers of one rollout batch (TRL's names where TRL has one)."""
    mask = batch.mask
    per_sequence_kl = ppo_math.masked_sum_per_row(ppo_math.kl_per_token(old_logp, ref_logp, "k1"), mask)
    k3 = ppo_math.masked_sum_per_row(ppo_math.kl_per_token(old_logp, ref_logp, "k3"), mask)
    non_score = ppo_math.masked_sum_per_row(-beta * kl, mask)
    lengths = batch.lengths.float()
    finished = batch.finished.float().mean().item()
    metrics = {
        "objective/scores": raw_scores.mean().item(), "objective/scores_penalized": scores.mean().item(),
        "objective/kl": per_sequence_kl.mean().item(), "objective/kl_k3": k3.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        "objective/entropy": ppo_math.masked_sum_per_row(-old_logp, mask).mean().item(),
        "critic/vf_explained_var": ppo_math.explained_variance(old_values, returns, mask).item(),
        "critic/values_mean": ppo_math.masked_mean(old_values, mask).item(),
        "critic/returns_mean": ppo_math.masked_mean(returns, mask).item(),
        "critic/advantages_std_raw": ppo_math.masked_var(raw_advantages, mask).sqrt().item(),
        "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/finished_fraction": finished, "response/clip_ratio": 1 - finished,
        "val/num_eos_tokens": round(finished * len(batch)),
    }
    if temperature == 1.0:  # the sampler's logprobs are raw: comparable only at temperature 1
        metrics.update(ppo.sampler_mismatch(batch, old_logp))
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_stage(main)
