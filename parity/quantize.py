"""Quantized base weights as ai-toolkit builds them before it renders previews.

ai-toolkit 0.12.26 quantizes the transformer (and the text encoder) of a `quantize: true` run in place and
samples its previews on those weights (notes: shared/research/aitk-quantization.md). Two families:

- `uint2`..`uint7` (`toolkit/util/uintx_quant.py`, torchao 0.10.0's UIntX weight-only scheme re-done bit for
  bit): asymmetric affine quantization in groups of 64 along the input dimension, every operation in the
  weight's own dtype (bf16), dequantized to that dtype at every forward and run through `F.linear`. `uint8` is
  refused (a silent no-op in ai-toolkit, as in torchao 0.10.0), and so is a layer whose input size is not a
  multiple of 64: both stay plain.
- `qfloat8` and the other optimum-quanto types: quantized by optimum-quanto itself (pinned to ai-toolkit's
  version), not here.

This module holds the uintx algorithm, written from the published description and checked against vectors
that ai-toolkit's own quantizer produced (`scripts/record-quant-vectors`, `tests/data/quant/`), and finds the
accuracy recovery adapter (ARA) a `uint3|<file>` run names, as ai-toolkit finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CaseError

UINTX_GROUP = 64  # input features per group (torchao's block size (1, 64))
FP32_EPS = torch.finfo(torch.float32).eps  # the smallest scale torchao allows


def uintx_bits(qtype: str) -> int | None:
    """The bit width of an ai-toolkit `uintN` qtype, or None for other qtypes."""
    if qtype.startswith("uint") and qtype[4:].isdigit() and 2 <= int(qtype[4:]) <= 8:
        return int(qtype[4:])
    return None


def uintx_applies(weight: torch.Tensor, bits: int, group: int = UINTX_GROUP) -> bool:
    """Whether ai-toolkit quantizes this Linear weight: 2-7 bits and an input size that is a multiple of the
    group (else the layer is left as it was)."""
    return 2 <= bits <= 7 and weight.dim() == 2 and weight.shape[1] % group == 0


@dataclass(frozen=True)
class UIntX:
    """A weight quantized to `bits` bits: integer codes [out, in], and per group a scale (the weight's dtype)
    and an integer zero point, both [out, in / group]."""

    codes: torch.Tensor  # uint8
    scale: torch.Tensor
    zero_point: torch.Tensor  # uint8
    bits: int
    group: int = UINTX_GROUP

    def dequantize(self) -> torch.Tensor:
        """The weight the previews ran on: (code - zero point) * scale, in the scale's dtype (exact subtraction of
        integers <= 255, one rounding in the product)."""
        rows, cols = self.codes.shape
        dtype = self.scale.dtype
        grouped = self.codes.view(rows, cols // self.group, self.group).to(dtype)
        centred = grouped - self.zero_point.to(dtype).unsqueeze(-1)
        return (centred * self.scale.unsqueeze(-1)).view(rows, cols)


@torch.no_grad()
def quantize_uintx(weight: torch.Tensor, bits: int, group: int = UINTX_GROUP) -> UIntX:
    """Quantize a Linear weight [out, in] the way ai-toolkit's uintN qtypes do. Every step runs in the weight's
    dtype, as there: the range of each group widened to include zero, scale = range / (2^bits - 1) (at least
    float32's epsilon), zero point = clamp(-round(min / scale)), codes = clamp(round(w * (1 / scale)) + zero
    point), rounding half to even."""
    if not uintx_applies(weight, bits, group):
        raise ValueError(f"uint{bits} with groups of {group} does not apply to a weight of shape "
                         f"{tuple(weight.shape)} (ai-toolkit leaves such a layer unquantized)")
    top = (1 << bits) - 1
    rows, cols = weight.shape
    grouped = weight.contiguous().view(rows, cols // group, group)
    low = torch.minimum(grouped.amin(dim=-1), weight.new_zeros(()))
    high = torch.maximum(grouped.amax(dim=-1), weight.new_zeros(()))
    scale = ((high - low) / float(top)).clamp(min=FP32_EPS)
    zero_point = (0 - (low / scale).round()).clamp(0, top).to(torch.int32)
    inverse = scale.reciprocal().unsqueeze(-1)  # `1.0 / scale` in the weight's dtype
    codes = ((grouped * inverse).round() + zero_point.unsqueeze(-1)).clamp(0, top)
    return UIntX(codes.view(rows, cols).to(torch.uint8), scale, zero_point.to(torch.uint8), bits, group)


def uintx_weight(weight: torch.Tensor, bits: int, group: int = UINTX_GROUP) -> torch.Tensor:
    """The dequantized weight ai-toolkit's forward uses for this Linear (the weight itself where it does not
    quantize: uint8, or an input size that is not a multiple of the group)."""
    if not uintx_applies(weight, bits, group):
        return weight
    return quantize_uintx(weight, bits, group).dequantize()


def hub_file(reference: str) -> tuple[str, str] | None:
    """ai-toolkit's reading of an ARA that is not a local file: `owner/repo/file.safetensors` -> (repo id, file).
    None for a reference of another shape (ai-toolkit stops on more than three parts)."""
    parts = reference.split("/")
    return (f"{parts[0]}/{parts[1]}", parts[2]) if len(parts) == 3 and all(parts) else None


def find_ara(reference: str, config: Path, resolve: Callable[[str], Path | None], override: Path | None,
             settings: Path) -> Path:
    """The ARA file a run used. In order: `ara:` in the case's parity.yaml (`override`), the reference as a
    training-machine path mapped to a local file (`resolve`), the hub file in the local Hugging Face cache (no
    network; ai-toolkit downloads the repo's main revision, so the content hash in the recipe is what pins it).
    Not found: a CaseError naming the file and where to put it."""
    if override is not None:
        if override.is_file():
            return override
        raise CaseError(settings, f"`ara:` names {override}, which does not exist",
                        "point `ara:` at the accuracy recovery adapter's .safetensors file")
    local = resolve(reference)
    if local is not None and local.is_file():
        return local
    hub = hub_file(reference)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub[0], hub[1])
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    where = (f"not a local file and not in the local Hugging Face cache (repo {hub[0]}, file {hub[1]})" if hub
             else "not a local file (and not of the hub form owner/repo/file.safetensors)")
    fetch = (f"`huggingface-cli download {hub[0]} {hub[1]}` on a machine with network and copy the file, then "
             if hub else "")
    raise CaseError(config, f"the accuracy recovery adapter {reference!r} (model.qtype) is {where}",
                    f"{fetch}put it beside the case and add `ara: <file>` to {settings}, or map its folder "
                    f"with a `paths:` line there")
