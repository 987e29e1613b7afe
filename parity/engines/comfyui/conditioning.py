"""How ComfyUI's Qwen edit nodes turn control images into conditioning, as functions the renderer calls on the
Diffusers components (written from what ComfyUI a125cd84 does; checked against its recordings in
cases/workspace/comfyui/):

- LoadImage: the file as RGB floats k/255 (`nodes.py` LoadImage.load_image), [1, H, W, 3].
- FluxKontextImageScale (`comfy_extras/nodes_flux.py`): the preset size nearest the image's aspect, a centre crop
  to that aspect, then Lanczos through 8-bit PIL images (`comfy/utils.py` common_upscale, lanczos).
- ImageScaleToTotalPixels (the Qwen-Image-Edit template, lanczos, 1 MP): Lanczos to 1 MP, aspect kept.
- TextEncodeQwenImageEdit[Plus] (`comfy_extras/nodes_qwen.py`): each image area-resized (torch `area`) to 384x384
  (Plus) or 1024x1024 (Edit) in area for the vision encoder, and to 1 MP in multiples of 8 (Plus; Edit: the same
  1 MP image) for the VAE; `comfy/text_encoders/qwen_vl.py` process_qwen2vl_images then resizes the vision image
  bilinearly to multiples of 28 and normalises it once with the CLIP mean/std.
- The vision tokens go into the language model in the vision transformer's window order (ComfyUI's
  Qwen2VLVisionTransformer.forward never undoes its window permutation), at 3-D rotary positions
  (`comfy/text_encoders/llama.py` Qwen25_7BVLI.forward: the image's temporal position is its first token's index).
- Reference latents (`comfy/ldm/qwen_image/model.py` _forward, method "index"): each reference is frame 1, 2, 3;
  rows and columns are centred as linspace(0, n-1) - n//2; text positions start after the target latent only.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...preprocess import comfy_area_size

# comfy_extras/nodes_flux.py PREFERED_KONTEXT_RESOLUTIONS: (width, height)
KONTEXT_SIZES = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # process_qwen2vl_images' defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_FACTOR = 28  # patch 14 x merge 2


def load_image(path: str) -> torch.Tensor:
    """LoadImage: [1, H, W, 3] float32 in [0, 1] (exif orientation applied, as ComfyUI does)."""
    from PIL import ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    return torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None]


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.lanczos: through 8-bit PIL images (values truncated), back to floats k/255. [B, C, H, W]."""
    out = []
    for image in samples:
        pil = Image.fromarray(np.clip(255. * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8))
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.array(pil).astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def _centre_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """common_upscale's "center" crop of [B, C, H, W] to the aspect of width x height."""
    old_w, old_h = samples.shape[-1], samples.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preset FluxKontextImageScale picks for an image of this size: the nearest aspect (first on ties)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_SIZES)
    return w, h


def kontext_scale(image: torch.Tensor) -> torch.Tensor:
    """FluxKontextImageScale on a LoadImage tensor [1, H, W, 3]."""
    width, height = kontext_size(image.shape[2], image.shape[1])
    samples = _centre_crop(image.movedim(-1, 1), width, height)
    return _lanczos(samples, width, height).movedim(1, -1)


def total_pixels_size(width: int, height: int) -> tuple[int, int]:
    """ImageScaleToTotalPixels' size at 1 MP, resolution steps 1: the aspect kept, each side rounded."""
    scale = math.sqrt(1024 * 1024 / (width * height))
    return round(width * scale), round(height * scale)


def scaled_size(width: int, height: int, crop: str) -> tuple[int, int]:
    """An image's size after the recipe's `control_crop` node (forms.CROP_*)."""
    from ...forms import CROP_KONTEXT, CROP_TOTAL_PIXELS

    if crop == CROP_KONTEXT:
        return kontext_size(width, height)
    if crop == CROP_TOTAL_PIXELS:
        return total_pixels_size(width, height)
    return width, height


def total_pixels_scale(image: torch.Tensor) -> torch.Tensor:
    """ImageScaleToTotalPixels (lanczos, 1 MP, resolution steps 1) on [1, H, W, 3]."""
    samples = image.movedim(-1, 1)
    return _lanczos(samples, *total_pixels_size(samples.shape[3], samples.shape[2])).movedim(1, -1)


def area_resize(image: torch.Tensor, rule: str) -> torch.Tensor:
    """common_upscale(..., "area", "disabled") of [1, H, W, 3] to the size the encode node's `rule` names
    (preprocess.COMFY_AREAS): [1, 3, h, w] in [0, 1]."""
    samples = image.movedim(-1, 1)
    width, height = comfy_area_size(samples.shape[3], samples.shape[2], rule)
    return F.interpolate(samples, size=(height, width), mode="area")


def vision_pixels(samples: torch.Tensor) -> torch.Tensor:
    """process_qwen2vl_images before patching: bilinear to multiples of 28, CLIP-normalised once. [3, h, w]."""
    height, width = samples.shape[-2], samples.shape[-1]
    h_bar, w_bar = round(height / VISION_FACTOR) * VISION_FACTOR, round(width / VISION_FACTOR) * VISION_FACTOR
    resized = F.interpolate(samples, size=(h_bar, w_bar), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN, dtype=resized.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=resized.dtype).view(3, 1, 1)
    return (resized - mean) / std


def text_positions(input_ids: torch.Tensor, image_token: int, grids: torch.Tensor) -> torch.Tensor:
    """The language model's 3-D rotary positions as ComfyUI's Qwen25_7BVLI.forward sets them: text tokens count
    on, an image's tokens sit at (first index, row, column) from that index, and the text after an image resumes
    at its first index plus the larger merged side. [3, 1, L] (long)."""
    ids = input_ids[0]
    length = ids.shape[0]
    positions = torch.arange(length).repeat(3, 1)
    image_at = (ids == image_token).nonzero().flatten().tolist()
    offset, cursor = 0, 0
    for t, h, w in grids.tolist():
        count = t * h * w // 4
        start = image_at[cursor]
        cursor += count
        end = start + count
        rows, cols = h // 2, w // 2
        positions[:, end:] = torch.arange(start + max(h, w) // 2 + offset,
                                          start + max(h, w) // 2 + offset + length - end)
        positions[0, start:end] = start + offset
        positions[1, start:end] = (torch.arange(rows).repeat_interleave(cols) + start + offset)[:count]
        positions[2, start:end] = (torch.arange(cols).repeat(rows) + start + offset)[:count]
        offset += max(h, w) // 2 - count
    return positions[:, None, :]


@contextlib.contextmanager
def window_order(visual):
    """Leave the vision transformer's merged tokens in its window order (as ComfyUI's does), not raster order."""
    def reorder(module, args, kwargs, output):
        grids = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        order, base = [], 0
        for grid in grids:
            index, _ = module.get_window_index(grid[None])
            order.append(index + base)
            base += int(grid.prod()) // 4
        output.pooler_output = output.pooler_output[torch.cat(order)]
        return output

    handle = visual.register_forward_hook(reorder, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def vae_pixels(image: torch.Tensor, rule: str) -> torch.Tensor:
    """The reference image the encode node gives the VAE, as Diffusers' VAE takes it: area-resized as `rule`
    names, cropped to multiples of 8 about the centre as VAE.encode does
    (vae_encode_crop_pixels), scaled to [-1, 1] (process_input). [1, 3, 1, h, w]."""
    samples = area_resize(image, rule)
    for dim in (-2, -1):
        size = samples.shape[dim]
        keep = size // 8 * 8
        if keep != size:
            samples = samples.narrow(dim, (size % 8) // 2, keep)
    return (samples * 2.0 - 1.0).unsqueeze(2)


def pad_to_patches(latents: torch.Tensor) -> torch.Tensor:
    """A reference latent [B, C, T, h, w] with odd sides padded to the 2x2 patches, circularly (wrapping the first
    row/column round), as the model's process_img does (comfy/ldm/common_dit.py pad_to_patch_size)."""
    pad = (0, latents.shape[-1] % 2, 0, latents.shape[-2] % 2, 0, 0)
    return F.pad(latents, pad, mode="circular") if any(pad) else latents


def encode(pipe, text: str, drop: int, pixels: list[torch.Tensor], device, *, prepared: bool,
           comfy_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's hidden states from this text encoder, the first `drop` tokens (the system template) cut.
    `prepared`: `pixels` are vision_pixels images (normalised once: the processor only patches them); else 0-1
    tensors the processor resizes, rescales and normalises as Diffusers has it. `comfy_tokens`: the vision tokens
    in window order at ComfyUI's 3-D positions; else Diffusers' (raster order, the model's default positions).
    (embeds [1, L, D], mask [1, L])."""
    flags = {"do_resize": False, "do_rescale": False, "do_normalize": False} if prepared else {}
    inputs = pipe.processor(text=[text], images=pixels or None, return_tensors="pt", **flags)
    encoder = pipe.text_encoder
    kwargs = {}
    if pixels:
        kwargs = {"pixel_values": inputs["pixel_values"].to(device, encoder.dtype),
                  "image_grid_thw": inputs["image_grid_thw"].to(device)}
        if comfy_tokens:
            image_token = pipe.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            kwargs["position_ids"] = text_positions(inputs["input_ids"], image_token,
                                                    inputs["image_grid_thw"]).to(device)
    order = window_order(encoder.model.visual) if pixels and comfy_tokens else contextlib.nullcontext()
    with order:
        out = encoder(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                      output_hidden_states=True, **kwargs)
    embeds = out.hidden_states[-1][:, drop:]
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)


def _rope_rows(pos_embed, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """Complex rotary factors of one axis at integer `positions`, angles in float64 as ComfyUI's rope() takes
    them (comfy/ldm/flux/math.py), cast to complex64."""
    dim = pos_embed.axes_dim[axis]
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64)
    omega = 1.0 / (pos_embed.theta ** scale)
    angles = torch.outer(positions.to(torch.float32).to(torch.float64), omega)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def comfy_rope(pos_embed, video_fhw, device, max_txt_seq_len):
    """QwenEmbedRope.forward's result with ComfyUI's positions ("index"): frame i for image i (target 0),
    rows/columns linspace(0, n-1) - n//2, text from max(rows//2, cols//2) of the target alone."""
    shapes = video_fhw[0] if isinstance(video_fhw, list) and video_fhw and isinstance(video_fhw[0], list) \
        else video_fhw
    shapes = shapes if isinstance(shapes, list) else [shapes]
    parts = []
    for index, (frames, height, width) in enumerate(shapes):
        f = _rope_rows(pos_embed, torch.full((frames,), index), 0).view(frames, 1, 1, -1)
        h = _rope_rows(pos_embed, torch.arange(height) - height // 2, 1).view(1, height, 1, -1)
        w = _rope_rows(pos_embed, torch.arange(width) - width // 2, 2).view(1, 1, width, -1)
        grid = torch.cat([f.expand(frames, height, width, -1), h.expand(frames, height, width, -1),
                          w.expand(frames, height, width, -1)], dim=-1)
        parts.append(grid.reshape(frames * height * width, -1))
    _, height, width = shapes[0]
    start = max(height // 2, width // 2)
    text = torch.arange(start, start + int(max_txt_seq_len))
    text_freqs = torch.cat([_rope_rows(pos_embed, text, axis) for axis in range(3)], dim=-1)
    return torch.cat(parts).to(device), text_freqs.to(device)


@contextlib.contextmanager
def comfy_positions(transformer):
    """Run the Diffusers transformer with ComfyUI's reference-latent positions."""
    pos_embed = transformer.pos_embed
    original = pos_embed.forward

    def forward(video_fhw, device=None, max_txt_seq_len=None, **_):
        return comfy_rope(pos_embed, video_fhw, device, max_txt_seq_len)

    pos_embed.forward = forward
    try:
        yield
    finally:
        pos_embed.forward = original
