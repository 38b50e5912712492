"""The generation layer on the tiny model: real vLLM (in process and as an
OpenAI-compatible server), real transformers, real weight pushes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from align.errors import AlignError
from align.generation import SamplingSettings, create_generator, merged_weights, render_prompts
from align.hardware import choose_backend, machine_key, pick_backend, record_backend_choice
from tests.conftest import free_port

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "How long do eggs keep?"}],
    [{"role": "system", "content": "You are a kitchen assistant."}, {"role": "user", "content": "Dice an onion?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Rice?"}],
    [{"role": "user", "content": "What can I cook with lentils, tomatoes, cumin and a little butter tonight?"}],
]
GREEDY = SamplingSettings(n=1, temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def vllm_generator(tiny_model_dir):
    with create_generator(str(tiny_model_dir), "vllm", "fp32", kv_cache_gib=0.25, max_model_len=512) as generator:
        yield generator


@pytest.fixture(scope="module")
def hf_generator(tiny_model_dir):
    with create_generator(str(tiny_model_dir), "hf", "fp32") as generator:
        yield generator


def load_model(path, noise: float = 0.0, seed: int = 0):
    """The tiny model, optionally with Gaussian noise on every weight (a stand-in for training)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return model


def tokens(results):
    return [[sample.token_ids for sample in samples] for samples in results]


def assert_same_greedy(expected, actual, tolerance=1e-4):
    assert tokens(expected) == tokens(actual)
    for samples_a, samples_b in zip(expected, actual):
        for a, b in zip(samples_a, samples_b):
            assert len(a.logprobs) == len(a.token_ids)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < tolerance
            assert a.text == b.text and a.finish_reason == b.finish_reason


def test_prompt_rendering_ends_with_the_generation_prompt(hf_generator):
    ids = render_prompts(hf_generator.tokenizer, CONVERSATIONS[:1])[0]
    text = hf_generator.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "How long do eggs keep?" in text


def test_vllm_and_hf_agree_on_greedy_tokens_and_logprobs(tiny_model_dir, vllm_generator, hf_generator):
    # a perturbed model too: the tiny random model alone repeats one token whatever the prompt
    for model in (load_model(tiny_model_dir), load_model(tiny_model_dir, noise=0.1, seed=1)):
        vllm_generator.update_weights(model)
        hf_generator.update_weights(model)
        expected = hf_generator.generate(CONVERSATIONS, GREEDY)
        assert_same_greedy(expected, vllm_generator.generate(CONVERSATIONS, GREEDY))
        assert all(len(samples[0].token_ids) == 12 and samples[0].finish_reason == "length" for samples in expected)


def test_vllm_follows_a_weight_push(tiny_model_dir, vllm_generator, hf_generator):
    vllm_generator.update_weights(load_model(tiny_model_dir))
    before = vllm_generator.generate(CONVERSATIONS, GREEDY)
    updated = load_model(tiny_model_dir, noise=0.1, seed=2)
    seconds = vllm_generator.update_weights(updated)
    hf_generator.update_weights(updated)
    after = vllm_generator.generate(CONVERSATIONS, GREEDY)
    assert tokens(after) != tokens(before)
    assert_same_greedy(hf_generator.generate(CONVERSATIONS, GREEDY), after)
    assert seconds < 60


def test_peft_push_sends_merged_weights_and_leaves_the_model_alone(tiny_model_dir, vllm_generator, hf_generator):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(tiny_model_dir, noise=0.1, seed=3),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    snapshot = {name: param.clone() for name, param in peft_model.named_parameters()}
    names = [name for name, _ in merged_weights(peft_model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in name for name in names)

    vllm_generator.update_weights(peft_model)
    assert all(torch.equal(snapshot[name], param) for name, param in peft_model.named_parameters())
    hf_generator.update_weights(peft_model.merge_and_unload())  # reference: peft's own merge
    assert_same_greedy(hf_generator.generate(CONVERSATIONS, GREEDY), vllm_generator.generate(CONVERSATIONS, GREEDY))


def test_seeded_sampling_is_reproducible_with_n_samples(vllm_generator, hf_generator):
    settings = SamplingSettings(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=7)
    for generator in (vllm_generator, hf_generator):
        first = generator.generate(CONVERSATIONS, settings)
        assert [len(samples) for samples in first] == [3] * len(CONVERSATIONS)
        assert tokens(first) == tokens(generator.generate(CONVERSATIONS, settings))
        other_seed = generator.generate(CONVERSATIONS, replace(settings, seed=8))
        assert tokens(other_seed) != tokens(first)
        assert len({tuple(sample.token_ids) for sample in first[3]}) > 1  # the n samples differ


HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "eval_prompts.jsonl"


def test_seeded_sampling_of_a_batch_larger_than_the_token_budget(vllm_generator):
    """The 65 held-out prompts x 2 samples overflow vLLM's 4,096-token step budget on a CPU, which
    used to split prefills and crash every seeded request (see the next test); now reproducible."""
    from align.data import load_prompts

    conversations = [record["prompt"] for record in load_prompts(HELD_OUT)]
    rendered = render_prompts(vllm_generator.tokenizer, conversations)
    assert sum(len(ids) for ids in rendered) * 2 > 4096
    settings = SamplingSettings(n=2, temperature=1.0, max_new_tokens=4, seed=1234)
    first = vllm_generator.generate(conversations, settings)
    assert tokens(first) == tokens(vllm_generator.generate(conversations, settings))


CHUNKED_SEEDED = """
import sys
from align.data import load_prompts
from align.errors import AlignError
from align.generation import SamplingSettings, VLLMGenerator
generator = VLLMGenerator(sys.argv[1], dtype="float32", kv_cache_gib=0.25, chunked_prefill=True,
                          max_num_batched_tokens=2048)
try:
    generator.generate([r["prompt"] for r in load_prompts(sys.argv[2])], SamplingSettings(n=2, max_new_tokens=4, seed=1))
except AlignError as error:
    print(error)
    sys.exit(2)
print("no crash")
"""


def test_chunked_prefill_with_seeds_is_the_crash_routed_around(tiny_model_dir):
    """The condition itself, in its own process (one engine per process): chunked prefill on, a batch
    over the budget, seeded requests -> vLLM's CPU runner fails; our engine turns it into one line."""
    done = subprocess.run([sys.executable, "-c", CHUNKED_SEEDED, str(tiny_model_dir), str(HELD_OUT)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "CPU Generator does not use offset" in done.stdout and "generation_backend: hf" in done.stdout


def test_openai_backend_matches_the_engine_and_takes_pushes(tiny_model_dir, vllm_server, vllm_generator, tmp_path):
    original = load_model(tiny_model_dir)
    with create_generator(str(tiny_model_dir), "openai", server_url=vllm_server) as client:
        client.weights_dir = tmp_path / "pushed"
        vllm_generator.update_weights(original)
        assert_same_greedy(vllm_generator.generate(CONVERSATIONS, GREEDY), client.generate(CONVERSATIONS, GREEDY))

        updated = load_model(tiny_model_dir, noise=0.1, seed=4)
        client.update_weights(updated)  # safetensors to a folder + /collective_rpc reload_weights
        vllm_generator.update_weights(updated)
        after = client.generate(CONVERSATIONS, GREEDY)
        assert_same_greedy(vllm_generator.generate(CONVERSATIONS, GREEDY), after)

        seeded = SamplingSettings(n=2, max_new_tokens=6, seed=5)
        sampled = client.generate(CONVERSATIONS, seeded)
        assert [len(samples) for samples in sampled] == [2] * len(CONVERSATIONS)
        assert tokens(sampled) == tokens(client.generate(CONVERSATIONS, seeded))


def test_openai_backend_without_a_server_fails_clearly(tiny_model_dir):
    with pytest.raises(AlignError, match="unreachable"):
        create_generator(str(tiny_model_dir), "openai", server_url=f"http://127.0.0.1:{free_port()}")


def test_auto_uses_the_benchmark_choice_for_this_machine(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    backend, _, reason = choose_backend()
    assert backend in ("vllm", "hf") and "no benchmark" in reason
    path = record_backend_choice("hf", "float32", {"hf": 300.0, "vllm": 200.0}, "tiny")
    assert machine_key() in path.read_text()
    backend, dtype, reason = choose_backend()
    assert (backend, dtype) == ("hf", "float32") and "bench_generation" in reason
    with create_generator(str(tiny_model_dir), "auto") as generator:
        assert generator.backend == "hf" and generator.dtype == "float32"


def test_auto_wants_vllm_at_least_twice_as_fast_as_transformers():
    measured_here = {"hf bfloat16": 233.0, "hf float32": 147.0, "vllm bfloat16": 431.0, "vllm float32": 308.0}
    backend, dtype, reason = pick_backend(measured_here)  # 1.85x: below the bar
    assert (backend, dtype) == ("hf", "bfloat16") and "1.85x" in reason
    backend, dtype, _ = pick_backend({**measured_here, "vllm bfloat16": 470.0})
    assert (backend, dtype) == ("vllm", "bfloat16")
    assert pick_backend({"hf float32": 100.0})[0] == "hf"
    with pytest.raises(AlignError, match="no transformers figure"):
        pick_backend({"vllm bfloat16": 400.0})


def test_weight_push_times_out_loudly(tiny_model_dir, vllm_generator):
    """Last test of the file on purpose: it leaves the shared engine unusable, as it should."""
    model = load_model(tiny_model_dir)
    started = time.perf_counter()
    with pytest.raises(AlignError, match="did not finish within"):
        vllm_generator.update_weights(model, timeout_s=0.001)
    assert time.perf_counter() - started < 5
    with pytest.raises(AlignError, match="unusable"):  # never silently sample from a half-loaded engine
        vllm_generator.generate(CONVERSATIONS, GREEDY)
    with pytest.raises(AlignError, match="already open"):  # one in-process engine per process
        create_generator(str(tiny_model_dir), "vllm", "fp32", kv_cache_gib=0.25, max_model_len=512)
