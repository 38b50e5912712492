"""Shared fixtures: tiny random models with the real SmolLM2 tokenizer, tiny data,
and a finished tiny SFT run that later stages can use as their parent.

Two tiers: `make test-fast` runs `-m "not slow"` (pure functions, config, data,
runs: seconds); `make test` runs everything. A test is slow when it uses a fixture
that loads a model, trains or starts a server (`SLOW_FIXTURES`, marked here
automatically, so a new test cannot slip into the fast tier by mistake), or when
it says so (`pytest.mark.slow`, e.g. a stage run as a subprocess).

The tiny model has head_dim 64 (vLLM's CPU attention needs 32/64/80/...) and the
real 49,152-token vocabulary, so every code path (chat template, pad != eos,
vLLM) is the one the default model takes, only faster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.argilla_fixtures"]

# Fixtures that load a model, train, or start a server: any test using one (directly or
# through another fixture) is slow.
SLOW_FIXTURES = {"default_model_dir", "tiny_model_dir", "tiny_sft_run", "argilla_server", "cold_dry"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """One runs/ folder for the session; each test picks its own run name."""
    root = tmp_path_factory.mktemp("runs")
    os.environ["ALIGN_RUNS"] = str(root)
    return root


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from align.models import ensure_default_model

    return ensure_default_model()


def build_tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama (hidden 128, head_dim 64) with SmolLM2's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), default_model_dir)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


TOPICS = ["rice", "eggs", "bread", "pasta", "onions", "garlic", "butter", "beans", "lentils", "tofu", "apples",
          "carrots", "spinach", "chicken", "salmon", "potatoes"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Small valid files in each format (conversations, prompts, ranked)."""
    folder = tmp_path_factory.mktemp("data")
    sft = [
        {"id": f"sft-{i}", "messages": [
            {"role": "user", "content": f"How should I store {topic}?"},
            {"role": "assistant", "content": f"Store {topic} in a cool, dry place.\n\n1. Seal them.\n2. Label them."}]}
        for i, topic in enumerate(TOPICS)
    ]
    prompts = [
        {"prompt_id": f"eval-{i}", "prompt": [{"role": "user", "content": f"How long do {topic} keep?"}],
         "reference": f"{topic.capitalize()} keep about a week in the fridge."}
        for i, topic in enumerate(TOPICS[:8])
    ]
    ranked = [
        {"prompt_id": f"pref-{i}", "prompt": [{"role": "user", "content": f"How do I cook {topic}?"}],
         "responses": [
             {"text": f"Cook {topic} gently.\n\n1. Heat the pan.\n2. Add the {topic}.", "rank": 1},
             {"text": f"Great question! Well, you could maybe cook {topic} somehow. Hope this helps!", "rank": 3},
             {"text": f"Heat a pan, then add {topic}.", "rank": 2}],
         "annotator": "fixture"}
        for i, topic in enumerate(TOPICS)
    ]
    return {
        "sft": write_jsonl(folder / "sft.jsonl", sft),
        "prompts": write_jsonl(folder / "prompts.jsonl", prompts),
        "ranked": write_jsonl(folder / "ranked.jsonl", ranked),
    }


def run_stage(stage: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> ARGS` as a user would (nothing imports a stage)."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


@pytest.fixture(scope="session")
def tiny_sft_run(runs_root, tiny_model_dir, tiny_data) -> str:
    """A finished SFT stage on the tiny model (run name returned); parent for later stages."""
    run = "tiny"
    result = run_stage(
        "sft", "--run", run, "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(tiny_data["sft"]), "--eval_file", str(tiny_data["prompts"]),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    )
    assert_ok(result)
    assert (runs_root / run / "sft" / "manifest.json").is_file()
    return run


@pytest.fixture(scope="session")
def cold_dry(runs_root, tmp_path_factory, default_model_dir) -> dict:
    """A finished SFT run of the tiny model on the cold-or-dry data, plus the hand-built reward run
    (tests/fakes.py); one per session, shared by the DPO and PPO stage tests."""
    from tests import fakes

    return fakes.make_cold_dry_run(runs_root, tmp_path_factory.mktemp("cold-dry"), default_model_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """A real vLLM OpenAI-compatible server on the tiny model (dev mode: accepts weight pushes)."""
    import requests

    port, log = free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 28)]
    with open(log, "w") as handle:
        server = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 240
    try:
        while True:
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, f"vLLM server exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"vLLM server not ready in 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
