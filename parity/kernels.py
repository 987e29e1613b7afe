"""Which kernels a render runs on a CPU: a named property of the environment, recorded with every render.

bf16 convolutions on a CPU without native bf16 (no AVX512-BF16/AMX: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is false) fall back in PyTorch to a reference implementation 15-20x slower than float32 there: a tiny model's
~1024x1024 control-image VAE encode takes 5 minutes instead of 20 s, its 256 px decode 43 s instead of 2 s. On
such a CPU the harness computes each bf16 convolution from the same bf16 inputs and weights in float32 and rounds
the result to bf16: fp32 accumulation with a bf16 output, which is what oneDNN's native bf16 convolution on CPUs
that have it and cuDNN's on GPUs do. Results may differ from PyTorch's slow fallback by a bf16 rounding step,
the kind of kernel difference the noise floor already measures. Everything else runs as it is.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

NATIVE = "native"
FP32_ACCUMULATE = "fp32-accumulate"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_conv_mode(device: str) -> str:
    """How bf16 convolutions run for renders on `device` (recorded in the environment)."""
    return FP32_ACCUMULATE if str(device).startswith("cpu") and not cpu_has_native_bf16() else NATIVE


def _fp32_accumulate(conv):
    @functools.wraps(conv)
    def wrapped(input, weight, bias=None, *args, **kwargs):
        if input.dtype == torch.bfloat16 and input.device.type == "cpu":
            out = conv(input.float(), weight.float(), None if bias is None else bias.float(), *args, **kwargs)
            return out.to(torch.bfloat16)
        return conv(input, weight, bias, *args, **kwargs)
    return wrapped


@contextlib.contextmanager
def cpu_bf16_convolutions(mode: str):
    """Run bf16 CPU convolutions as `mode` says for the duration (torch's own functions restored after)."""
    if mode != FP32_ACCUMULATE:
        yield
        return
    saved = F.conv2d, F.conv3d
    F.conv2d, F.conv3d = _fp32_accumulate(saved[0]), _fp32_accumulate(saved[1])
    try:
        yield
    finally:
        F.conv2d, F.conv3d = saved
