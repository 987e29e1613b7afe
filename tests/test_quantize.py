"""parity.quantize against what ai-toolkit's own uintN quantizer made of the same weights
(tests/data/quant/uintx_aitk.safetensors, written by scripts/record-quant-vectors from ai-toolkit 27a03a91)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from parity.quantize import quantize_uintx, uintx_applies, uintx_bits, uintx_weight

VECTORS = Path(__file__).parent / "data" / "quant" / "uintx_aitk.safetensors"
LAYERS = ("normal", "positive", "negative", "special", "odd_width")


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    return load_file(VECTORS)


def test_vectors_come_from_the_pinned_ai_toolkit():
    with safe_open(VECTORS, "pt") as f:
        meta = f.metadata()
    assert meta["ai_toolkit_commit"].startswith("27a03a91") and meta["made_by"] == "scripts/record-quant-vectors"


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("layer", LAYERS)
def test_dequantized_weight_and_output_equal_ai_toolkits_bit_for_bit(recorded, layer, bits):
    w, b, x = (recorded[f"{layer}.{k}"] for k in ("weight", "bias", "input"))
    key = f"{layer}.uint{bits}"
    assert bool(recorded[f"{key}.quantized"]) == uintx_applies(w, bits)  # the same layers are left alone
    ours = uintx_weight(w, bits)
    if uintx_applies(w, bits):
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, recorded[f"{key}.dequantized"])
    else:
        assert ours is w
    assert torch.equal(F.linear(x, ours, b), recorded[f"{key}.output"])  # the forward the previews ran


def test_codes_and_parameters_are_in_range_and_zero_is_exact(recorded):
    w = recorded["special.weight"]
    q = quantize_uintx(w, 3)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7 and q.codes.shape == w.shape
    assert q.scale.shape == q.zero_point.shape == (8, 3) and q.scale.dtype == torch.bfloat16
    assert float(q.scale.min()) >= torch.finfo(torch.float32).eps  # the all-zero and tiny groups clamp
    deq = q.dequantize()
    assert torch.all(deq[0, :64] == 0)  # zero stays zero (the range always includes it)
    assert deq.abs().max() <= w.abs().max() * 1.01


def test_bad_requests_are_refused_with_the_reason():
    assert [uintx_bits(t) for t in ("uint3", "uint7", "uint8", "qfloat8", "uint9", "uint")] == [3, 7, 8, None,
                                                                                                  None, None]
    with pytest.raises(ValueError, match=r"uint3 with groups of 64 does not apply to a weight of shape \(8, 96\)"):
        quantize_uintx(torch.zeros(8, 96, dtype=torch.bfloat16), 3)
    with pytest.raises(ValueError, match="uint8"):
        quantize_uintx(torch.zeros(8, 64, dtype=torch.bfloat16), 8)


def test_the_vectors_tell_bf16_arithmetic_from_float32(recorded):
    """The same algorithm computed in float32 and rounded once gives other weights on every quantized layer:
    the vectors pin down the dtype of every step, not just the scheme."""
    for layer in ("normal", "positive", "negative", "special"):
        w = recorded[f"{layer}.weight"]
        for bits in range(2, 8):
            in_float32 = uintx_weight(w.float(), bits).to(torch.bfloat16)
            assert not torch.equal(in_float32, recorded[f"{layer}.uint{bits}.dequantized"]), (layer, bits)
