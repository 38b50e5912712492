"""align.ppo_math against TRL 1.12's PPO, the last TRL release that has one (slow tier).

TRL 1.12 runs in a subprocess (tests/oracles/trl_ppo.py) with its install folder
on PYTHONPATH, shadowing the venv's TRL 1.16; `make test-deps` installs it
(mk/oracles.mk, `oracle-deps`). A missing install fails these tests: skipping
would let the only external check on our PPO math vanish silently.

Level 1: masked mean / variance / whitening on random masked fp64 tensors.
Level 2: one full TRL PPO update (policy, reference, value model, SGD) against
the same update written with our functions (`reference_update` below), on
inputs where our intentional differences cannot show:
  - full-length responses (no eos, no pad): TRL's score lands one column after
    the eos and its value mask keeps one extra column (design notes P1); on a
    full row both put the score on the last column and every mask is all ones;
  - TRL's approxkl / ratio / entropy are unmasked means: equal on full rows;
  - TRL never clips gradients, so neither does this update.
tests/test_ppo_math.py shows by hand that ours is right where they differ.

The whole module is slow: it starts a TRL process (about 8 s of imports) and needs
the oracle that `make test-deps` installs, which `make test-fast` does not ask for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align import files, ppo_math

pytestmark = pytest.mark.slow

TRL_ORACLE_VERSION = "1.12.0"
ORACLE_SCRIPT = Path(__file__).resolve().parent / "oracles" / "trl_ppo.py"


def oracle_dir() -> Path:
    return files.cache_dir() / "oracles" / f"trl-{TRL_ORACLE_VERSION}"


def run_oracle(command: str, inputs: dict, tmp_path: Path, timeout: int = 300) -> dict:
    target = oracle_dir()
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        pytest.fail(f"TRL {TRL_ORACLE_VERSION} oracle missing at {target}: `make test-deps` installs it", pytrace=False)
    source, result = tmp_path / f"{command}-in.pt", tmp_path / f"{command}-out.pt"
    torch.save(inputs, source)
    env = dict(os.environ, PYTHONPATH=str(target), TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ORACLE_SCRIPT), command, str(source), str(result)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"oracle exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    outputs = torch.load(result, weights_only=True)
    assert outputs["trl_version"] == TRL_ORACLE_VERSION
    return outputs


# ---------------------------------------------------------------- level 1: masked statistics

def random_masked_cases(count: int = 6) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for index in range(count):
        rows, width = 3 + index, 5 + 2 * index
        values = torch.randn(rows, width, generator=generator, dtype=torch.float64) * (1 + index) + index
        lengths = torch.randint(1, width + 1, (rows,), generator=generator)
        lengths[0] = max(int(lengths[0]), 2)  # at least 2 valid entries for the unbiased variance
        cases.append({"values": values, "mask": ppo_math.response_mask(lengths, width).to(torch.float64)})
    return cases


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-7) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


def test_masked_statistics_match_trl(tmp_path):
    cases = random_masked_cases()
    oracle = run_oracle("masked-stats", {"cases": cases}, tmp_path)["results"]
    for case, expected in zip(cases, oracle, strict=True):
        values, mask = case["values"], case["mask"]
        valid = mask.bool()
        close(ppo_math.masked_mean(values, mask), expected["mean"])
        close(ppo_math.masked_mean(values, mask, dim=1), expected["mean_rows"])
        close(ppo_math.masked_var(values, mask, unbiased=True), expected["var_unbiased"])
        close(ppo_math.masked_var(values, mask, unbiased=False), expected["var_biased"])
        for shift_mean, key in ((True, "whiten"), (False, "whiten_keep_mean")):
            ours = ppo_math.masked_whiten(values, mask, shift_mean=shift_mean)
            close(ours[valid], expected[key][valid])
            assert (ours[~valid] == 0).all()  # TRL leaves padding whitened too; ours zeroes it
