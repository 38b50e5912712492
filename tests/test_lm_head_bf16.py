"""TRL's chunked LM head on a bf16 CPU: its backward products run in bf16 once
`training.bf16_lm_head_products_on_cpu` is in place (`fit_to_hardware` puts it there where
training runs under bf16 autocast on a CPU with native bf16), and the gradient stays within
bf16 rounding of an fp32 computation."""

import pytest
import torch
from trl import SFTConfig
from trl.kernels import chunked_logprob

from align import hardware, training


@pytest.fixture
def restored_trl(monkeypatch):
    """TRL's own product in place for the test (even if an earlier test in this process patched it),
    and whatever the test patches undone after it."""
    current = chunked_logprob._addmm_fp32
    original = getattr(current, "trl_original", current)
    monkeypatch.setattr(chunked_logprob, "_addmm_fp32", original)
    return original


def test_bf16_products_run_in_bf16_and_fp32_ones_are_left_to_trl(restored_trl):
    torch.manual_seed(0)
    a, b = torch.randn(64, 300).bfloat16(), torch.randn(300, 32).bfloat16()
    trl_result = torch.ones(64, 32)
    restored_trl(trl_result, a, b)
    training.bf16_lm_head_products_on_cpu()
    ours = torch.ones(64, 32)
    chunked_logprob._addmm_fp32(ours, a, b)
    assert torch.equal(ours, 1 + torch.mm(a, b).float())  # one bf16 GEMM, added to the fp32 accumulator
    assert not torch.equal(ours, trl_result)  # TRL's product is the fp32 one
    assert torch.allclose(ours, trl_result, rtol=0.02, atol=0.3)
    a32, b32 = a.float(), b.float()
    expected, ours = torch.zeros(64, 32), torch.zeros(64, 32)
    restored_trl(expected, a32, b32)
    chunked_logprob._addmm_fp32(ours, a32, b32)
    assert torch.equal(ours, expected)  # fp32 operands: TRL's own code


def test_patch_is_applied_once(restored_trl):
    training.bf16_lm_head_products_on_cpu()
    patched = chunked_logprob._addmm_fp32
    training.bf16_lm_head_products_on_cpu()
    assert chunked_logprob._addmm_fp32 is patched and patched is not restored_trl


def test_lm_head_gradients_under_bf16_autocast_stay_near_fp32(restored_trl, monkeypatch):
    """Three vocabulary chunks (the rounding TRL avoids is one per chunk): the gradients of the
    hidden states and of the head's weight (full fine-tuning) with the bf16 products are within
    bf16 rounding of the all-fp32 ones, and every product went through the bf16 path."""
    torch.manual_seed(0)
    hidden = torch.randn(96, 64)
    weight = torch.randn(2500, 64) * 0.2
    targets = torch.randint(0, 2500, (96,))

    def gradients(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_leaf, weight_leaf = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            log_probs, *_ = chunked_logprob.ChunkedLogProbFunction.apply(
                hidden_leaf, weight_leaf, None, targets, 1.0, 1000, None, 1.0, ("entropy",))
        (-log_probs.mean()).backward()
        return hidden_leaf.grad, weight_leaf.grad

    exact = gradients(autocast=False)
    training.bf16_lm_head_products_on_cpu()
    patched, calls = chunked_logprob._addmm_fp32, []

    def counted(accumulator, a, b):
        calls.append(a.dtype)
        patched(accumulator, a, b)

    monkeypatch.setattr(chunked_logprob, "_addmm_fp32", counted)
    ours = gradients(autocast=True)
    assert calls == [torch.bfloat16] * 6  # 3 chunks x (hidden, weight)
    for mine, reference in zip(ours, exact):
        assert (mine - reference).norm() / reference.norm() < 0.02


@pytest.mark.parametrize("native, precision, patched", [(True, "auto", True), (True, "fp32", False),
                                                        (False, "auto", False)])
def test_fit_to_hardware_patches_only_for_bf16_training_on_a_native_bf16_cpu(
        restored_trl, monkeypatch, tmp_path, native, precision, patched):
    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda flags=None: native)
    config = training.fit_to_hardware(SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False),
                                      precision, tmp_path)
    assert config.bf16 is patched
    assert (chunked_logprob._addmm_fp32 is not restored_trl) is patched
