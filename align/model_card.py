"""Model cards: the `model/README.md` of every model-producing stage (sft, reward, dpo, ppo, rloo).

Hugging Face's model-card format: YAML front matter (`base_model`, `library_name`, `tags`,
`pipeline_tag`, `license` when the base model's card names one), then markdown. Everything a
card says comes from the stage's manifest and its parents' manifests, so it can only repeat
what the run recorded: lineage with manifest hashes, data files with their sha256, the stage's
key metrics, versions, seed, and how to load the folder.

Hand-written: TRL writes cards too (`trl.trainer.utils.generate_model_card`, called by
`create_model_card` of its trainers, from `trl/templates/lm_model_card.md`), but its card
needs a hub model id and knows only the trainer's name; ours works offline, before any push,
and carries the run's lineage and verdicts. The front matter follows TRL's where it can
(library_name transformers, tags "trl" + the method, base_model only when it is a hub id).

`card_text(manifest, lineage)` is pure; `write_model_card(model_dir, manifest)` gathers the
lineage from disk and writes the card atomically. Stages call it inside their temporary
output folder, before it is renamed into place, so a crashed stage never has a card.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from align import evaluation, runs
from align.comparison import fmt
from align.files import atomic_write_text, sha256_file
from align.models import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE

CARD_FILE = "README.md"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repo ids


@dataclass(frozen=True)
class CardKind:
    """What differs between the cards of the stages that produce a model."""

    title: str  # what the model is: "A supervised fine-tune (SFT)"
    tags: tuple[str, ...]
    pipeline_tag: str
    auto_class: str  # the transformers class that loads model/


CARD_KINDS = {
    "sft": CardKind("A supervised fine-tune (SFT, TRL SFTTrainer)", ("trl", "align", "sft"), "text-generation", "AutoModelForCausalLM"),
    # TRL's own tag for RewardTrainer is "reward-trainer"; "reward-model" says what the folder is.
    "reward": CardKind("A reward model trained on human rankings (TRL RewardTrainer)", ("trl", "align", "reward-model", "reward-trainer"),
                       "text-classification", "AutoModelForSequenceClassification"),
    "dpo": CardKind("A policy aligned by direct preference optimisation (DPO, TRL DPOTrainer)", ("trl", "align", "dpo"), "text-generation",
                    "AutoModelForCausalLM"),
    # No "trl" tag: align's PPO is hand-written (TRL 1.16 has no PPO trainer).
    "ppo": CardKind("A policy aligned by proximal policy optimisation (PPO, align's own) against the reward model", ("align", "ppo", "rlhf"),
                    "text-generation", "AutoModelForCausalLM"),
    "rloo": CardKind("A policy aligned by REINFORCE leave-one-out (RLOO, TRL RLOOTrainer) against the reward model",
                     ("trl", "align", "rloo", "rlhf"), "text-generation", "AutoModelForCausalLM"),
}


@dataclass(frozen=True)
class Lineage:
    """What a card needs beyond its own manifest; `read_lineage` gathers it from disk."""

    ancestors: dict[str, dict] = field(default_factory=dict)  # manifest sha256 -> that parent's manifest
    base_hub_id: str | None = None  # the root base model's hub id, when it has one
    base_license: str | None = None  # from the root base model's own card
    stage_folder: str | None = None  # where the finished output lives (default: runs/<run>/<stage>)


# ---------------------------------------------------------------------------
# The card, from manifests (pure)


def card_text(manifest: dict, lineage: Lineage | None = None) -> str:
    """The whole README.md of a stage's model/ folder."""
    lineage = lineage or Lineage()
    stage = manifest.get("stage")
    if stage not in CARD_KINDS:
        raise ValueError(f"no model card for stage {stage!r}; cards exist for {', '.join(CARD_KINDS)}")
    kind = CARD_KINDS[stage]
    sections = [
        front_matter(kind, lineage),
        heading(manifest, kind, lineage),
        METRIC_SECTIONS[stage](manifest, lineage),
        lineage_section(manifest, lineage),
        data_section(manifest),
        training_section(manifest),
        versions_section(manifest),
        loading_section(manifest, kind, lineage),
    ]
    return "\n\n".join(section.strip("\n") for section in sections if section) + "\n"


def front_matter(kind: CardKind, lineage: Lineage) -> str:
    fields = {}
    if lineage.base_hub_id:  # the hub refuses a base_model that is not a hub id
        fields["base_model"] = lineage.base_hub_id
    fields["library_name"] = "transformers"
    if lineage.base_license:
        fields["license"] = lineage.base_license
    fields["pipeline_tag"] = kind.pipeline_tag
    fields["tags"] = list(kind.tags)
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---"


def stage_path(manifest: dict, lineage: Lineage) -> str:
    """Where the stage's output lives once finished: runs/<run>/<stage> unless the writer knows better."""
    return lineage.stage_folder or f"runs/{manifest.get('run')}/{manifest.get('stage')}"


def heading(manifest: dict, kind: CardKind, lineage: Lineage) -> str:
    base = base_model_entry(manifest, lineage)
    source = base_display(base, lineage) if base else "an unrecorded base model"
    parent = manifest.get("parent")
    start = f", starting from `{parent['path']}`" if parent else ""
    return (f"# {manifest.get('run')}/{manifest.get('stage')}\n\n"
            f"{kind.title}, made by the align pipeline{start}; base model: {source}.\n"
            f"Stage output: `{stage_path(manifest, lineage)}` (this card is `model/README.md` there; every number below "
            "is copied from its `manifest.json`).")


def base_model_entry(manifest: dict, lineage: Lineage) -> dict | None:
    """The `base_model` manifest entry at the root of the lineage (the pretrained model the run began with)."""
    root = manifest
    seen = set()
    while (root.get("parent") or {}).get("manifest_sha256") in lineage.ancestors:
        sha = root["parent"]["manifest_sha256"]
        if sha in seen:  # a cycle cannot happen with real manifests; never loop on a hand-edited one
            break
        seen.add(sha)
        root = lineage.ancestors[sha]
    return root.get("base_model") or manifest.get("base_model")


def base_display(base: dict, lineage: Lineage) -> str:
    name = base.get("name", "?")
    if name == "default":
        return (f"[{DEFAULT_MODEL_HUB_ID}](https://huggingface.co/{DEFAULT_MODEL_HUB_ID}) (align's `default`: "
                f"{base.get('source', 'a converted GGUF')}, dequantised to safetensors)")
    if lineage.base_hub_id:
        return f"[{lineage.base_hub_id}](https://huggingface.co/{lineage.base_hub_id})"
    return f"`{name}` (a local folder)"


def nearest(manifest: dict, lineage: Lineage, key: str):
    """`key` of this manifest, else of the nearest parent that recorded it (DPO/PPO keep the SFT tokenizer)."""
    current, seen = manifest, set()
    while current.get(key) is None:
        sha = (current.get("parent") or {}).get("manifest_sha256")
        if sha not in lineage.ancestors or sha in seen:
            return None
        seen.add(sha)
        current = lineage.ancestors[sha]
    return current[key]


# ---------------------------------------------------------------------------
# Metrics, one section per stage kind


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def interval(values, spec: str) -> str:
    if not values or len(values) != 2:
        return ""
    return f" [{fmt(values[0], spec)}, {fmt(values[1], spec)}]"


def sft_metrics(manifest: dict, lineage: Lineage) -> str:
    m = manifest.get("metrics", {})
    before, after = m.get("eval_loss_before"), m.get("eval_loss_after")
    change = fmt(after - before, "+.3f") if before is not None and after is not None else "n/a"
    return "## Results\n\n" + table(("metric", "value"), [
        ("held-out eval loss, before -> after", f"{fmt(before, '.3f')} -> {fmt(after, '.3f')} ({change})"),
        ("train loss", fmt(m.get("train_loss"), ".3f")),
        ("train steps", m.get("train_steps", "n/a")),
        ("train examples", m.get("train_examples", "n/a")),
    ])


def reward_metrics(manifest: dict, lineage: Lineage) -> str:
    m = manifest.get("metrics", {})
    passed = m.get("gate_passed")
    verdict = {True: "PASSED", False: "FAILED"}.get(passed, "not recorded")
    lines = [f"## Quality gate: {verdict}", ""]
    if "pairwise_accuracy" in m:
        # The gate is recomputed from the recorded metrics and thresholds: the same function the stage ran.
        gate = evaluation.reward_gate(m, m.get("gate_thresholds") or {})
        lines.append(table(("check", "value", "threshold", "result"), [
            (check.label, fmt(check.value, ".3f"), check.threshold_text,
             {True: "pass", False: "FAIL", None: "not checked"}[check.passed]) for check in gate.checks]))
        lines += ["", table(("held-out metric", "value"), [
            ("pairwise accuracy [95% CI]", fmt(m.get("pairwise_accuracy"), ".3f")
             + interval(m.get("pairwise_accuracy_ci95"), ".3f")),
            ("mean margin r_chosen - r_rejected", fmt(m.get("mean_margin"), ".3f")),
            ("expected calibration error", fmt(m.get("ece"), ".3f")),
            ("Spearman(score, length)", fmt(m.get("length_correlation"), ".3f")),
            ("pairs train / held-out", f"{m.get('train_pairs', 'n/a')} / {m.get('heldout_pairs', 'n/a')}"),
        ])]
    for reason in m.get("gate_reasons") or []:
        lines.append(f"- failed: {reason}")
    lines += ["", "The stage's `report.md` explains each number with plots. Stages that consume this model warn, "
              "or refuse with `reward_gate_policy: refuse`, when the gate failed."]
    return "\n".join(lines)


def policy_metrics(manifest: dict, lineage: Lineage) -> str:
    """DPO, PPO and RLOO: the held-out verdict against the SFT model (compare's statistics)."""
    name = manifest["stage"]
    label = name.upper()
    m = manifest.get("metrics", {})
    lines = ["## Held-out verdict against the SFT model", ""]
    if m.get("verdict_line"):
        lines += ["```", m["verdict_line"], "```", ""]
    cut_before, cut_after = m.get("cut_fraction_sft"), m.get(f"cut_fraction_{name}")
    lines.append(table(("metric", "value"), [
        ("verdict", m.get("verdict", "n/a")),
        (f"reward difference ({label} - SFT) [95% CI]",
         fmt(m.get("reward_difference"), "+.3f") + interval(m.get("reward_difference_ci95"), ".3f")),
        ("win rate [95% CI]", fmt(m.get("win_rate"), ".0%") + interval(m.get("win_rate_ci95"), ".0%")
         + (f" ({m['win_rate_ties']} ties)" if m.get("win_rate_ties") is not None else "")),
        (f"KL({label} \\|\\| SFT), {m.get('kl_estimator', '?')}", fmt(m.get("kl"), ".3f") + " nats"),
        ("length change", fmt(m.get("length_change"), "+.0%")),
        ("mean reward SFT -> " + label, f"{fmt(m.get('mean_reward_sft'), '.3f')} -> "
                                        f"{fmt(m.get(f'mean_reward_{name}'), '.3f')}"),
        ("answers cut at the cap SFT -> " + label, f"{fmt(cut_before, '.0%')} -> {fmt(cut_after, '.0%')}"),
        ("house style SFT -> " + label, f"{fmt(m.get('style_score_sft'), '.2f')} -> "
                                        f"{fmt(m.get(f'style_score_{name}'), '.2f')}"),
    ]))
    decoding = m.get("eval_decoding") or {}
    if decoding:
        lines += ["", f"{m.get('heldout_prompts', '?')} held-out prompts x {decoding.get('n')} samples, "
                      f"temperature {decoding.get('temperature')}, up to {decoding.get('max_new_tokens')} new tokens, "
                      f"seed {decoding.get('seed')}; an answer cut at the cap scores "
                      f"{m.get('truncation_penalty')} below the reward model."]
    return "\n".join(lines)


METRIC_SECTIONS = {"sft": sft_metrics, "reward": reward_metrics, "dpo": policy_metrics, "ppo": policy_metrics,
                   "rloo": policy_metrics}


# ---------------------------------------------------------------------------
# Lineage, data, training, versions, loading


def lineage_section(manifest: dict, lineage: Lineage) -> str:
    lines = ["## Lineage", ""]
    base = base_model_entry(manifest, lineage)
    if base:
        lines.append(f"- base model: {base_display(base, lineage)}"
                     + (f", weights sha256 `{base['weights_sha256']}`" if base.get("weights_sha256") else ""))
    for role, key in (("parent", "parent"), ("reward model", "reward_model")):
        entry = manifest.get(key)
        if not entry:
            continue
        line = f"- {role}: `{entry.get('path')}` ({entry.get('stage')}), manifest sha256 `{entry.get('manifest_sha256')}`"
        recorded = lineage.ancestors.get(entry.get("manifest_sha256"))
        if key == "reward_model" and recorded is not None:
            gate = recorded.get("metrics", {}).get("gate_passed")
            line += {True: "; its quality gate passed", False: "; its quality gate FAILED"}.get(gate, "")
        lines.append(line)
    if not manifest.get("parent"):
        lines.append("- parent: none (trained directly from the base model)")
    git = manifest.get("git") or {}
    if git.get("commit"):
        lines.append(f"- align commit `{git['commit']}`" + (" (with uncommitted changes)" if git.get("dirty") else ""))
    if manifest.get("command"):
        lines.append(f"- command: `{manifest['command']}`")
    return "\n".join(lines)


def data_section(manifest: dict) -> str:
    inputs = manifest.get("inputs") or []
    config = manifest.get("config") or {}
    lines = ["## Data", ""]
    if inputs:
        lines.append(table(("role", "file", "records", "sha256"), [
            (entry.get("role"), f"`{entry.get('path')}`", entry.get("records", ""), f"`{entry.get('sha256')}`")
            for entry in inputs]))
    if config.get("argilla_dataset"):
        lines.append(f"\nRankings pulled from Argilla dataset `{config.get('argilla_workspace', '?')}/"
                     f"{config['argilla_dataset']}` (saved in the stage folder as `rankings.jsonl`, hashed above).")
    if not inputs and not config.get("argilla_dataset"):
        lines.append("No data files recorded.")
    return "\n".join(lines)


def training_section(manifest: dict) -> str:
    m, config = manifest.get("metrics", {}), manifest.get("config") or {}
    facts = [("seed", manifest.get("seed"))]
    if manifest["stage"] == "dpo":
        facts += [("mode", m.get("mode")), ("rounds", len(m.get("rounds") or [])), ("beta", config.get("beta")),
                  ("loss_type", config.get("loss_type"))]
    if manifest["stage"] == "ppo":
        facts += [("updates", len(m.get("updates") or [])), ("kl_coef", config.get("kl_coef")),
                  ("mean clip fraction", fmt(m.get("clipfrac_mean"), ".3f")),
                  ("rollout score first -> last update",
                   f"{fmt(m.get('rollout_score_first'), '.3f')} -> {fmt(m.get('rollout_score_last'), '.3f')}")]
    if manifest["stage"] == "rloo":
        facts += [("samples per prompt", config.get("num_generations")), ("beta", config.get("beta")),
                  ("sampled answers", m.get("sampled_responses")),
                  ("rollout reward first -> last step",
                   f"{fmt(m.get('rollout_reward_first'), '.3f')} -> {fmt(m.get('rollout_reward_last'), '.3f')}")]
    facts += [("train steps", m.get("train_steps")), ("learning rate", config.get("learning_rate")),
              ("LoRA", config.get("use_peft")), ("trainable parameters", m.get("trainable_parameters")),
              ("bf16 autocast", m.get("bf16")), ("started", manifest.get("started_at"))]
    rows = [(name, ", ".join(map(str, value)) if isinstance(value, list) else value)
            for name, value in facts if value is not None]
    return "## Training\n\n" + table(("setting", "value"), rows) + (
        "\n\nThe full resolved config is the stage folder's `config.yaml` (and the manifest's `config`).")


def versions_section(manifest: dict) -> str:
    versions = manifest.get("versions") or {}
    if not versions:
        return ""
    return "## Versions\n\n" + "\n".join(f"- {name}: {version}" for name, version in versions.items())


def loading_section(manifest: dict, kind: CardKind, lineage: Lineage) -> str:
    path = f"{stage_path(manifest, lineage)}/model"
    template = nearest(manifest, lineage, "chat_template_sha256")
    pad, eos = nearest(manifest, lineage, "pad_token"), nearest(manifest, lineage, "eos_token")
    note = ("Prompts must go through the tokenizer's own chat template (saved in this folder"
            + (f", sha256 `{template}`" if template else "") + "); the model was trained on that rendering only.")
    if pad and eos:
        note += f" The pad token `{pad}` differs from eos `{eos}`."
    if kind.auto_class == "AutoModelForSequenceClassification":
        code = f'''from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "{path}"  # or the hub repo this folder was pushed to
model = AutoModelForSequenceClassification.from_pretrained(path)  # num_labels 1: one score
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{{"role": "user", "content": "How should I store rice?"}},
            {{"role": "assistant", "content": "In an airtight container, somewhere cool and dry."}}]
text = tokenizer.apply_chat_template(messages, tokenize=False)
text = text[: text.rfind(tokenizer.eos_token) + len(tokenizer.eos_token)]  # end at the end-of-turn token
score = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()'''
        note += (" The score is read at the last non-pad token: end the text exactly at the assistant's "
                 "end-of-turn token, as training did (`align.scoring.reward_text`).")
    else:
        code = f'''from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{path}"  # or the hub repo this folder was pushed to
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{{"role": "user", "content": "How should I store rice?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=1.0)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''
    return f"## How to load\n\n```python\n{code}\n```\n\n{note}"


# ---------------------------------------------------------------------------
# Gathering the lineage and writing (I/O)


def read_lineage(manifest: dict, stage_folder: str | Path | None = None) -> Lineage:
    """Parent manifests reachable from `manifest` (only those whose file still has the recorded
    sha256), the root base model's hub id and license, and the output's final folder."""
    ancestors: dict[str, dict] = {}
    pending = [manifest.get(key) for key in ("parent", "reward_model")]
    while pending:
        entry = pending.pop()
        if not entry or entry.get("manifest_sha256") in ancestors:
            continue
        path = Path(entry.get("path", "")) / "manifest.json"
        if not path.is_file() or sha256_file(path) != entry.get("manifest_sha256"):
            continue  # rerun since: its current manifest is not the one this stage consumed
        parent = json.loads(path.read_text())
        ancestors[entry["manifest_sha256"]] = parent
        pending += [parent.get(key) for key in ("parent", "reward_model")]
    base = base_model_entry(manifest, Lineage(ancestors)) or {}
    hub_id, license_name = base_identity(base)
    return Lineage(ancestors, hub_id, license_name, str(stage_folder) if stage_folder else None)


def base_identity(base: dict) -> tuple[str | None, str | None]:
    """(hub id, license) of a manifest's base_model entry; None where unknown."""
    name, path = base.get("name"), base.get("path")
    if name == "default":
        return DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE
    local = Path(path) if path else None
    is_folder = local is not None and local.is_dir()
    hub_id = name if name and HUB_ID.fullmatch(name) and not Path(name).exists() else None
    card = local / CARD_FILE if is_folder else cached_hub_card(hub_id)
    return hub_id, card_license(card)


def cached_hub_card(hub_id: str | None) -> Path | None:
    """The base model's README.md from the local hub cache, never from the network (the card is
    written at the end of training, which must not fail or wait on the hub)."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, CARD_FILE)
    return Path(found) if isinstance(found, str) else None


def card_license(card: Path | None) -> str | None:
    """The `license` of a model card's front matter (None without a card, a license or valid YAML)."""
    if card is None or not card.is_file():
        return None
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(card)
    except yaml.YAMLError:
        return None  # a broken base card only loses the license line; it must not fail the stage
    value = metadata.get("license") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def write_model_card(model_dir: str | Path, manifest: dict, stage_folder: str | Path | None = None) -> Path:
    """Write `model_dir/README.md` from the stage's manifest (atomically). `stage_folder`: where the
    output lives once finished (default: runs/<run>/<stage> under $ALIGN_RUNS, as `align.runs` renames it)."""
    folder = stage_folder or runs.stage_dir(manifest.get("run"), manifest.get("stage"))
    return atomic_write_text(Path(model_dir) / CARD_FILE, card_text(manifest, read_lineage(manifest, folder)))
