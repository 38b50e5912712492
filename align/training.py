"""Shared trainer setup: hardware defaults, LoRA, saving.

TRL configs default to bf16 on an accelerator and fail on a CPU-only machine;
`fit_to_hardware` picks the device and precision once for every stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

from align import hardware, processes
from align.errors import ConfigError
from align.models import CONVERSION_STAMP, chat_template_hash

def fit_to_hardware(trl_config, precision: str, output_dir: Path, checkpoints: Path | None = None):
    """Return a copy of a TRL/transformers config set for this machine and output folder.

    checkpoints: the stage's resume folder (align/resume.py): the Trainer writes its checkpoints
    there as the config's save_strategy / save_steps / save_total_limit say, with optimizer and RNG
    state (save_only_model off: a checkpoint must be able to resume). None: no checkpoints, the
    Trainer's scratch goes to <output_dir>/trainer and the stage saves its final model itself.

    `report_to` stays the user's (align.trackers opens the runs and points TensorBoard at
    logs/tensorboard). `dataclasses.replace` re-runs the config's own validation.

    Training in bf16 on a CPU with native bf16 also points TRL's chunked LM head at bf16 products for
    the whole process (`bf16_lm_head_products_on_cpu`).

    Several processes (DDP): every trainable parameter here gets a gradient in every step (LoRA
    adapters, with `lora_top_layers` too: peft puts adapters only into the top layers, and all of
    those are on the loss's path; the reward score head; full fine-tuning of a causal LM), so DDP
    need not search the graph for unused ones; transformers would search for a PeftModel (None
    means True there), an extra traversal per step. A user's explicit value wins. The tests'
    2-rank runs would fail at the second step (DDP's "Expected to have finished reduction") if a
    parameter went unused. ddp_timeout: see align/processes.py."""
    changes = {
        "use_cpu": not hardware.has_cuda(),
        "bf16": hardware.use_bf16(precision),
        "fp16": False,
        "ddp_timeout": processes.ddp_timeout_s(trl_config.ddp_timeout),
    }
    if checkpoints is None:  # the stage saves the final model itself, atomically
        changes.update(output_dir=str(Path(output_dir) / "trainer"), save_strategy="no")
    else:
        changes.update(output_dir=str(checkpoints), save_only_model=False)
    if changes["bf16"] and changes["use_cpu"] and hardware.cpu_has_bf16():
        bf16_lm_head_products_on_cpu()
    if trl_config.ddp_find_unused_parameters is None:
        changes["ddp_find_unused_parameters"] = False
    if trl_config.include_num_input_tokens_seen in ("no", False) and not hasattr(trl_config, "num_generations"):
        # real tokens trained, for the stage's cost accounting (align/cost.py); GRPO/RLOO batches
        # carry no input_ids, where the Trainer would warn at every step
        changes["include_num_input_tokens_seen"] = "non_padding"
    if getattr(trl_config, "generation_batch_size", None) and getattr(trl_config, "steps_per_generation", None):
        # GRPO/RLOO configs fill in both from either one, then refuse both being set: keep the step
        # count (which a user's generation_batch_size already set) and let the copy derive the size
        changes["generation_batch_size"] = None
    try:
        return dataclasses.replace(trl_config, **changes)
    except ValueError as error:  # the config's own validation: a user's combination of keys
        raise ConfigError(f"{type(trl_config).__name__}: {error}") from None


def bf16_lm_head_products_on_cpu() -> None:
    """Let TRL's chunked LM head (`trl.kernels.chunked_logprob`, the loss of SFT, DPO and RLOO)
    run its backward products in bf16 on a CPU with native bf16, as every other layer's do under
    autocast. TRL accumulates each vocabulary chunk's gradient product in fp32; on CUDA it gets that
    from one bf16 GEMM with an fp32 output (`out_dtype`), which the CPU build lacks
    (`aten::mm.dtype`: NotImplementedError in torch 2.13), so TRL upcasts both operands and runs the
    product in fp32 (`_addmm_fp32`): a [1152, 32768] x [32768, 576] product took 0.197 s that way
    against 0.048 s in bf16 (AMX Xeon); the fp32 products were 7.5% of a profiled SFT step, and
    the whole SFT stage trained 4% faster without them. Here the product runs in bf16
    (fp32 accumulation inside the GEMM, one rounding of its output) and is added to TRL's fp32
    accumulator. The rounding TRL avoids is one per vocabulary chunk: two for a 49k vocabulary at
    TRL's 32,768-wide chunks, where the plain autocast LM head rounds once. SFT's held-out loss was
    the same either way (README: Where the time goes). Idempotent; patched once per process, and
    only TRL's CPU branch changes."""
    import torch
    from trl.kernels import chunked_logprob

    fp32_product = chunked_logprob._addmm_fp32
    if getattr(fp32_product, "align_bf16_on_cpu", False):
        return

    def product(accumulator, a, b):
        if accumulator.device.type == "cpu" and a.dtype == torch.bfloat16:
            accumulator.add_(torch.mm(a, b.to(a.dtype)))
        else:
            fp32_product(accumulator, a, b)

    product.align_bf16_on_cpu = True
    product.trl_original = fp32_product
    chunked_logprob._addmm_fp32 = product


@contextlib.contextmanager
def counted(trainer, reference_forward: bool = False):
    """Count the training run inside into the open cost phase (align/cost.py): forward and backward
    over the real tokens the Trainer saw (its `num_input_tokens_seen`, set by `fit_to_hardware`;
    summed over processes, so each counts its share), plus one reference forward per token when
    `reference_forward` (DPO without precomputed reference log-probs), and the positions its batches
    held, padding included (`PositionCounter`: the phase's padding figure). The count starts where the
    Trainer's state starts training: a resumed run's state carries the killed run's tokens."""
    from transformers import TrainerCallback

    from align import cost

    class TokensAtStart(TrainerCallback):
        tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens = int(state.num_input_tokens_seen or 0)

    start = TokensAtStart()
    trainer.add_callback(start)
    positions = PositionCounter(trainer.data_collator)
    trainer.data_collator = positions
    try:
        yield
    finally:
        trainer.remove_callback(start)
        trainer.data_collator = positions.collator
    tokens = (int(trainer.state.num_input_tokens_seen or 0) - start.tokens) // processes.current().world_size
    sizes = cost.sizes(trainer.model)
    cost.count_training(sizes, tokens)
    if reference_forward:
        cost.count_forward(sizes, tokens)
    if positions.count and tokens:  # this process's batches; the reference forward runs over them too
        passes = 2 if reference_forward else 1
        cost.count_positions(positions.count * passes, tokens * passes)


class PositionCounter:
    """Wraps a Trainer's data collator and adds up the positions its batches hold (`input_ids`:
    rows x padded width), which the model computes whether they are real tokens or padding:
    the padding figure of the stage's cost report. Batches without `input_ids` count nothing, and
    neither do batches collated in dataloader worker processes (`dataloader_num_workers` > 0)."""

    def __init__(self, collator):
        self.collator = collator
        self.count = 0

    def __call__(self, features):
        batch = self.collator(features)
        input_ids = batch.get("input_ids") if hasattr(batch, "get") else None
        if input_ids is not None and hasattr(input_ids, "numel"):
            self.count += int(input_ids.numel())
        return batch

    def __getattr__(self, name):  # the Trainer reads e.g. `tokenizer` off its collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def count_reference_pass(dpo_trainer) -> None:
    """Count TRL's precomputed reference log-probs (`precompute_ref_log_probs`: one forward over
    every prompt + chosen and prompt + rejected sequence, run when the DPOTrainer is built), this
    process's share, into the open cost phase."""
    from align import cost

    rows = dpo_trainer.train_dataset
    tokens = sum(2 * len(prompt) + len(chosen) + len(rejected) for prompt, chosen, rejected
                 in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
    cost.count_forward(cost.sizes(dpo_trainer.model), tokens // processes.current().world_size)


def record_effective_batch(out, trainer_args) -> int:
    """Manifest `effective_batch` = per device x gradient accumulation x processes, printed in one line."""
    world_size = processes.current().world_size
    per_device, accumulation = trainer_args.per_device_train_batch_size, trainer_args.gradient_accumulation_steps
    effective = per_device * accumulation * world_size
    out.set(world_size=world_size, effective_batch=effective)
    out.say(f"[{out.stage}] effective batch {effective} = {per_device} per device x {accumulation} accumulation "
            f"x {world_size} process{'es' * (world_size != 1)}")
    return effective


def lora_top_layers_field(default: int | None = None, subject: str = "LoRA"):
    """The `lora_top_layers` option of every stage that trains LoRA adapters: one help text
    for the one meaning (`lora_config` reads it)."""
    return dataclasses.field(default=default, metadata={
        "help": f"{subject} only in the top N transformer layers (peft layers_to_transform; all of them if the model "
                "has fewer); backward stops there; null or 0: every layer"})


def lora_config(model_args, top_layers: int | None, base: str):
    """TRL's LoRA config from ModelConfig (None without use_peft), limited to the top
    `top_layers` transformer layers when set (peft's layers_to_transform).

    Why the top layers only: backward stops at the lowest adapted layer. Measured here:
    a reward step cost 0.51x of all-layer LoRA; a DPO round only 0.93x, for half the
    reward gain, so DPO keeps every layer by default."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None or not top_layers:
        return config
    if top_layers < 1:
        raise ConfigError(f"lora_top_layers: must be >= 1 (or null for every layer), got {top_layers}")
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(base).num_hidden_layers
    top = min(top_layers, layers)  # a model with fewer layers gets LoRA in all of them
    config.layers_to_transform = list(range(layers - top, layers))
    return config


def save_model(model, tokenizer, folder: Path) -> None:
    """Save a plain (merged) Hugging Face model folder that any later stage can load."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_peft_outputs(peft_model, tokenizer, out) -> dict:
    """Keep the LoRA adapter in adapter/ and save the merged model in model/.

    The adapter lives apart from the merged model: an adapter_config.json next to
    full weights makes from_pretrained stack the adapter again, silently."""
    peft_model.save_pretrained(out.path / "adapter")
    tokenizer.save_pretrained(out.path / "adapter")
    merged = peft_model.merge_and_unload()
    save_model(merged, tokenizer, out.model_dir)
    return {"model": "model", "adapter": "adapter"}


def save_outputs(model, tokenizer, out, use_peft: bool) -> None:
    """Save what a training stage produced: merged model (+ adapter when LoRA)."""
    if use_peft:
        out.set(outputs=save_peft_outputs(model, tokenizer, out))
    else:
        save_model(model, tokenizer, out.model_dir)
        out.set(outputs={"model": "model"})


def refuse_sharded_weights(trainer) -> None:
    """ConfigError under FSDP or DeepSpeed ZeRO-3, before training starts: `save_trained` merges and
    saves the model from rank 0, which there holds only its shard of the weights (gathering them
    for the merge is not written yet, issue 13). DDP and ZeRO-2 keep whole weights on every rank."""
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
        raise ConfigError("FSDP / DeepSpeed ZeRO-3 shard the weights, and this stage saves the merged model "
                          "from rank 0: not supported yet (issue 13); use configs/accelerate/ddp.yaml or "
                          "deepspeed_zero2.yaml")


def save_trained(trainer, tokenizer, out, use_peft: bool) -> None:
    """`save_outputs` from the trainer's main process only (the others hold the same weights under
    DDP), after every rank has finished training; then the trainer scratch goes."""
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        save_outputs(trainer.model, tokenizer, out, use_peft)
        remove_trainer_scratch(out)


def loss_curve(trainer) -> list[list[float]]:
    """[[step, loss], ...] from the trainer's log history (the loss averaged over every process)."""
    return [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]


def record_model_facts(out, tokenizer, base_model: str, resolved_path: str) -> None:
    """Where the weights came from: the config's name, the folder, and its conversion stamp if any."""
    stamp = Path(resolved_path) / CONVERSION_STAMP
    base = {"name": base_model, "path": resolved_path}
    if stamp.is_file():
        base.update(json.loads(stamp.read_text()))
    out.set(base_model=base, chat_template_sha256=chat_template_hash(tokenizer),
            pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)


def remove_trainer_scratch(out) -> None:
    """The Trainer's output_dir holds nothing we keep (save_strategy: no)."""
    shutil.rmtree(out.path / "trainer", ignore_errors=True)


def last_logged(trainer, key: str):
    """The last value of `key` in the trainer's log history, or None."""
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return entry[key]
    return None
