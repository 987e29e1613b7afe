"""CPU bf16 convolutions: fp32 accumulation with a bf16 result where the CPU has no native bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parity import kernels


def test_mode_follows_the_device_and_the_cpu():
    assert kernels.bf16_conv_mode("cuda") == kernels.NATIVE
    expected = kernels.NATIVE if kernels.cpu_has_native_bf16() else kernels.FP32_ACCUMULATE
    assert kernels.bf16_conv_mode("cpu") == expected


def test_fp32_accumulate_is_the_fp32_convolution_of_the_bf16_values_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 2, 24, 24, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 8, 3, 3, 3, generator=g).to(torch.bfloat16)
    b = torch.randn(16, generator=g).to(torch.bfloat16)
    original = F.conv3d
    with kernels.cpu_bf16_convolutions(kernels.FP32_ACCUMULATE):
        assert F.conv3d is not original
        ours = F.conv3d(x, w, b, padding=1)
        conv2d = F.conv2d(x[:, :, 0], w[:, :, 0], b, padding=1)
        plain = F.conv3d(x.float(), w.float(), b.float(), padding=1)  # fp32 inputs pass through untouched
    assert F.conv3d is original  # torch's own function is back
    assert ours.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.equal(ours, original(x.float(), w.float(), b.float(), padding=1).to(torch.bfloat16))
    assert torch.equal(conv2d, F.conv2d(x[:, :, 0].float(), w[:, :, 0].float(), b.float(), padding=1).bfloat16())
    # PyTorch's own bf16 kernel gives the same values up to bf16 rounding of the sum (a kernel difference)
    native = original(x, w, b, padding=1).float()
    assert ((ours.float() - native).abs() <= native.abs() * 2 ** -7 + 2 ** -6).all()


def test_native_mode_changes_nothing():
    before = F.conv2d, F.conv3d
    with kernels.cpu_bf16_convolutions(kernels.NATIVE):
        assert (F.conv2d, F.conv3d) == before
