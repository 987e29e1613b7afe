"""ComfyUI's fp8 weights, computed with on any device as ComfyUI computes with them (issue 46, point 4).

ComfyUI's default Qwen graphs load the diffusion model as float8_e4m3fn (the official `*_fp8_e4m3fn.safetensors`
files, or UNETLoader's weight_dtype `fp8_e4m3fn`) and the text encoder from `qwen_2.5_vl_7b_fp8_scaled.safetensors`.
Both keep the weights in fp8 and cast them to the compute dtype at every matmul (comfy/ops.py `manual_cast`,
`scaled_fp8_ops`); a cast from fp8 is exact in bf16 and fp32. So a Diffusers model computes the same thing when each
weight is rounded to its fp8 value once, in place, and kept in the model's dtype: no second copy of the weights, no
cast per matmul. Recipe field `precision` (parity.precision):

- `transformer:fp8_e4m3fn` (`round_transformer`): ComfyUI builds the whole diffusion model in the fp8 dtype (every
  `operations.Linear` and `operations.RMSNorm` gets `dtype=float8_e4m3fn`: weights, biases and norm weights alike;
  checked on ComfyUI's own QwenImageTransformer2DModel) and copies the checkpoint into it, each tensor cast with
  torch's round-to-nearest-even. Every parameter of the Diffusers transformer is rounded so.
- `text_encoder:fp8_scaled` (`scale_text_encoder`): ComfyUI's scaled-fp8 Linear (language model and vision tower)
  holds an fp8 weight and a float32 per-tensor `scale_weight`, its bias in fp8 too (unscaled); every other layer
  (embedding, norms, the vision patch convolution) stays in the file's dtype. The file's scales are Comfy-Org's: they
  are assumed to be per-tensor absmax/448, the weight stored as (W / scale) rounded to fp8.
- A LoRA on the fp8 transformer (`merge_lora`): ComfyUI's model_patcher patches the fp8 weight in fp32 and rounds
  the sum back to fp8 by stochastic rounding (comfy/float.py), seeded per weight by the CRC-32 of its state-dict
  key (`string_to_seed`).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max; e4m3fn has no infinity
COMFY_PREFIX = "diffusion_model."  # ComfyUI's state-dict names for the diffusion model's weights


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """`x` as float8_e4m3fn, round to nearest even, saturating at +-448 (NaN stays NaN).

    Saturation is what ComfyUI's load of a bf16 checkpoint into an fp8 model gives with the torch this harness pins
    (2.14: the cast clamps finite overflow and infinities to +-448, torch/headeronly/util/Float8_e4m3fn.h; checked on
    CPU with bf16, fp16 and fp32 sources). Older torch wrote NaN for |x| >= 480; the clamp keeps the saturating
    result on any torch. Qwen's weights are far inside the range, so the two differ on no real checkpoint."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_values(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to its float8_e4m3fn value, in `x`'s dtype (exact in fp16, bf16 and fp32)."""
    return to_fp8(x).to(x.dtype)


def is_fp8_valued(x: torch.Tensor) -> bool:
    """Every element of `x` is a float8_e4m3fn value (NaN aside)."""
    return bool(torch.equal(torch.nan_to_num(fp8_values(x)), torch.nan_to_num(x)))


@torch.no_grad()
def round_transformer(transformer: torch.nn.Module, after_module=None) -> int:
    """Every parameter of the transformer replaced by its fp8 value, one parameter at a time (the old tensor, a view
    of the model's file or not, goes as its replacement comes: never two copies of the model). Buffers (rotary
    tables) are computed, not loaded, and stay. `after_module()` runs after each module (memory trimming). Returns
    the number of Linear layers rounded."""
    linears = 0
    for module in transformer.modules():
        params = list(module.named_parameters(recurse=False))
        for _, param in params:
            param.data = fp8_values(param.data)
        if isinstance(module, torch.nn.Linear):
            linears += 1
        if params and after_module is not None:
            after_module()
    return linears


class ScaledFP8Linear(torch.nn.Linear):
    """ComfyUI's scaled_fp8_ops Linear (comfy/ops.py, fp8_matrix_mult off, as on a CPU): the weight holds the fp8
    values W/scale (in the model's dtype, exactly), `scale_weight` the float32 per-tensor scale. At each call the
    weight, the bias and the scale are cast to the input's dtype, and the scale goes on whichever operand is smaller:
    linear(x, W * scale, b) when the weight has fewer elements than the input, else linear(x * scale, W, b)."""

    scale_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        scale = self.scale_weight.to(device=x.device, dtype=x.dtype)
        if weight.numel() < x.numel():
            return torch.nn.functional.linear(x, weight * scale, bias)
        return torch.nn.functional.linear(x * scale, weight, bias)


def tensor_scale(weight: torch.Tensor) -> torch.Tensor:
    """The assumed per-tensor scale of a Comfy-Org scaled-fp8 file: absmax / 448 in float32 (1 for an all-zero
    weight, which any scale leaves zero)."""
    amax = weight.detach().abs().amax().to(torch.float32)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


@torch.no_grad()
def scale_linear(layer: torch.nn.Linear) -> None:
    """One Linear into ScaledFP8Linear in place: W -> fp8(W / scale) kept in W's dtype, the bias -> its fp8 value
    (ComfyUI's bias parameter is fp8 and unscaled), `scale_weight` a float32 buffer beside them."""
    weight = layer.weight.data
    scale = tensor_scale(weight)
    layer.weight.data = to_fp8(weight.to(torch.float32) / scale).to(weight.dtype)
    if layer.bias is not None:
        layer.bias.data = fp8_values(layer.bias.data)
    layer.register_buffer("scale_weight", scale, persistent=False)
    layer.__class__ = ScaledFP8Linear


def text_encoder_linears(text_encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers of the Diffusers text encoder (Qwen2_5_VLForConditionalGeneration) that ComfyUI's module
    has: all of the language model and the vision tower, not `lm_head` (ComfyUI's Qwen25_7BVLI has no lm_head; the
    prompt encoders read hidden states and never call it)."""
    head = text_encoder.get_output_embeddings() if hasattr(text_encoder, "get_output_embeddings") else None
    return [(n, m) for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


@torch.no_grad()
def scale_text_encoder(text_encoder: torch.nn.Module, after_layer=None) -> int:
    """Every Linear ComfyUI's scaled-fp8 text encoder has (`text_encoder_linears`) made a ScaledFP8Linear, one layer
    at a time. The caller has copied the plain parameters into memory of their own (precision.own_plain_parameters;
    `lm_head` is copied here), so that the model's file is unmapped once its last Linear is replaced. Returns the
    count."""
    layers = text_encoder_linears(text_encoder)
    kept = {id(m) for _, m in layers}
    for module in text_encoder.modules():  # lm_head: a Linear that stays as loaded
        if isinstance(module, torch.nn.Linear) and id(module) not in kept:
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
    for _, layer in layers:
        scale_linear(layer)
        if after_layer is not None:
            after_layer()
    return len(layers)


def string_to_seed(text: str) -> int:
    """ComfyUI's seed for a weight's stochastic rounding (comfy/model_patcher.py string_to_seed): the CRC-32 of the
    key (reflected polynomial 0xEDB88320, initial value and final xor 0xFFFFFFFF), each character entering by its
    code point. For keys of code points below 256 this is zlib.crc32 of their latin-1 bytes."""
    crc = 0xFFFFFFFF
    for char in text:
        crc ^= ord(char)
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 * (crc & 1))
    return crc ^ 0xFFFFFFFF


# float8_e4m3fn's layout for the stochastic rounding below
_EXPONENT_BITS, _MANTISSA_BITS, _BIAS = 4, 3, 7
_SLICE_ELEMENTS = 4096 * 4096  # ComfyUI rounds a large weight in row slices of about this many elements


def _stochastic_round_rows(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One slice rounded to fp8 values in float16, with ComfyUI's arithmetic (comfy/float.py
    manual_stochastic_round_to_float8 with calc_mantissa): every step in float16, in the same order, so that the
    bits agree, including its quirks (log2 rounded to fp16 can name the next exponent for a value just below a power
    of two; a zero gets sign +0, a value that rounds to zero keeps its sign)."""
    half = rows.half()
    magnitude = half.abs()
    sign = torch.where(magnitude == 0, 0, torch.sign(half))
    exponent = torch.clamp(torch.floor(torch.log2(magnitude)) + _BIAS, 0, 2 ** _EXPONENT_BITS - 1)
    normal = exponent != 0
    step = 2 ** _MANTISSA_BITS
    # the mantissa in units of its last place: normal numbers relative to their leading 1, subnormals from 0
    units = torch.where(normal, (magnitude / (2.0 ** (exponent - _BIAS)) - 1.0) * step,
                        magnitude / (2.0 ** (1 - _BIAS - _MANTISSA_BITS)))
    noise = torch.rand(units.size(), dtype=units.dtype, layout=units.layout, device=units.device, generator=generator)
    fraction = (units + noise).floor() / step
    value = sign * torch.where(normal, (2.0 ** (exponent - _BIAS)) * (1.0 + fraction),
                               (2.0 ** (1 - _BIAS)) * fraction)
    return value.clamp(min=-FP8_MAX, max=FP8_MAX)


@torch.no_grad()
def stochastic_round(value: torch.Tensor, seed: int) -> torch.Tensor:
    """`value` stochastically rounded to float8_e4m3fn, as ComfyUI's comfy.float.stochastic_rounding(value,
    torch.float8_e4m3fn, seed) rounds it: one torch.Generator on the value's device seeded with `seed`, the rows in
    slices of round(rows / max(1, numel / 4096^2)) (Python's round, as theirs), each slice drawing its uniform noise
    from that generator in turn. The random stream is the device's: a weight rounded on a GPU differs from one
    rounded on a CPU, as in ComfyUI."""
    generator = torch.Generator(device=value.device)
    generator.manual_seed(seed)
    out = torch.empty(value.shape, dtype=FP8, device=value.device)
    slices = max(1, value.numel() / _SLICE_ELEMENTS)
    rows = max(1, round(value.shape[0] / slices))
    for start in range(0, value.shape[0], rows):
        out[start:start + rows].copy_(_stochastic_round_rows(value[start:start + rows], generator))
    return out


def weight_key(module: str) -> str:
    """ComfyUI's state-dict name of a diffusion-model Linear's weight (its module names are Diffusers' own)."""
    return f"{COMFY_PREFIX}{module}.weight"


@torch.no_grad()
def merge_lora(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, multiplier: float, module: str,
               device: torch.device | str | None = None) -> torch.Tensor:
    """ComfyUI's LoRA patch of one fp8 weight (model_patcher.patch_weight_to_device with comfy/lora.py and
    weight_adapter/lora.py): the weight in float32, plus (multiplier * alpha/rank) * (up @ down) in float32 (ai-toolkit
    saves alpha = rank: the factor is the multiplier, the sum as pipeline.merged_lora computes it), stochastically
    rounded to float8_e4m3fn with the seed of its key. Computed on `device` (ComfyUI patches on the device it runs
    on, whose random stream the rounding draws from); returned in fp8 on that device."""
    device = torch.device(device) if device is not None else weight.device
    w = weight.detach().to(device=device, dtype=torch.float32)
    w = w + multiplier * (up.to(device, torch.float32) @ down.to(device, torch.float32))
    return stochastic_round(w, string_to_seed(weight_key(module)))
