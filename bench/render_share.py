"""On a CUDA machine: the full metric set's share of one real-size Qwen-Image-Edit-2509 render (target: under 1 %).

    python bench/render_share.py [--layers N] [--controls K] [--steps S]

The 20B checkpoint cannot be downloaded here, so the render's cost is measured on the same Diffusers classes at
their real configuration (QwenImageTransformer2DModel and AutoencoderKLQwenImage constructed with their defaults,
which are the released model's sizes) holding random bf16 weights: a forward pass costs the same whatever the
weights' values. Timed on the GPU, side by side in this one run:
  - one transformer forward at 1024x1024 with K control images at ~1024x1024 (the reference pipeline's
    VAE_IMAGE_SIZE) and 300 text tokens, as QwenImageEditPlusPipeline calls it;
  - the VAE encoding K control images and decoding the output.
A render is S steps x 2 forwards (true CFG, guidance > 1, the reference default of 25 steps) plus the VAE; the
text encoder (once per prompt) is left out, so the share printed is an upper bound. The metric set is timed as
the harness runs it on this machine, one torch thread: SSIM and the perceptual distances on the CPU, then on the
GPU (the runner's choice when it renders there); hints, maps and JPEG encoding stay on the CPU. `--layers` builds
fewer blocks (a smoke test on a small GPU); the figure printed then is scaled to 60 blocks and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import full_set, pair, timed  # noqa: E402  (bench/metrics.py)

from parity import compare as cmp  # noqa: E402
from parity import metrics as M  # noqa: E402
from parity.hints import hints  # noqa: E402

REAL_LAYERS = 60


def random_module(cls, device: str, dtype: torch.dtype, **config):
    """`cls(**config)` with random weights made directly on `device` in `dtype` (no fp32 copy on the host: the
    real transformer would need 82 GB for it). Buffers (the rotary tables) are computed as the class computes them."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        module = cls(**config)
    gen = torch.Generator(device).manual_seed(0)
    for name, param in list(module.named_parameters()):
        value = torch.empty(param.shape, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)
        set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
    return module.to(device).eval()


def cuda_seconds(fn, repeat: int = 3) -> float:
    fn()  # warm-up: kernels chosen, caches filled
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=REAL_LAYERS)
    parser.add_argument("--controls", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/render_share.py needs a CUDA device (the CPU figures are bench/metrics.py's)")
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    dev, dtype = "cuda", torch.bfloat16
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    torch.set_num_threads(1)
    sets = {}
    for where in ("cpu", dev):  # the harness runs the metrics on the render device
        metrics = M.build(device=where)
        for m in metrics:
            m.available
        sets[where] = full_set(metrics, where)
        print(f"metric set, SSIM and perceptual distances on {where} (the rest on the CPU, 1 thread): "
              f"PNG preview {sets[where]['png']:.3f} s, JPEG preview {sets[where]['jpeg']:.3f} s")
    a, b, _ = pair()
    measured = M.measure(a, b, M.build(device=dev), device=dev)
    parts = {"ssim on the GPU": lambda: cmp.compare(a, b, device=dev),
             "hints (CPU)": lambda: hints(a, b),
             "maps (CPU; SSIM map reused)": lambda: M.maps(a, b, measured)}
    for name, fn in parts.items():
        print(f"  {name:28s} {timed(lambda: (fn(), torch.cuda.synchronize()))[0]:.3f} s")
    gpu, cpu = cmp.compare(a, b, device=dev), cmp.compare(a, b)
    print(f"  SSIM on the GPU vs scikit-image: {gpu.ssim:.8f} vs {cpu.ssim:.8f} "
          f"(difference {abs(gpu.ssim - cpu.ssim):.1e}; map max difference "
          f"{float(abs(gpu.ssim_full - cpu.ssim_full).max()):.1e})")

    start = time.perf_counter()
    transformer = random_module(QwenImageTransformer2DModel, dev, dtype, num_layers=args.layers)
    params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer: {args.layers} blocks, {params / 1e9:.2f} B parameters, built in "
          f"{time.perf_counter() - start:.1f} s")
    side, text = 1024, 300
    tokens = (side // 16) ** 2  # VAE /8, then 2x2 patches
    g = torch.Generator(dev).manual_seed(1)
    hidden = torch.randn(1, tokens * (1 + args.controls), 64, device=dev, dtype=dtype, generator=g)
    context = torch.randn(1, text, 3584, device=dev, dtype=dtype, generator=g)
    mask = torch.ones(1, text, device=dev, dtype=torch.long)
    shapes = [[(1, side // 16, side // 16)] * (1 + args.controls)]
    t = torch.full((1,), 0.5, device=dev, dtype=dtype)

    def forward():
        with torch.no_grad():
            transformer(hidden_states=hidden, encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                        timestep=t, img_shapes=shapes, return_dict=False)

    fwd = cuda_seconds(forward) * REAL_LAYERS / args.layers
    scaled = "" if args.layers == REAL_LAYERS else f" (scaled from {args.layers} blocks to {REAL_LAYERS})"
    print(f"transformer forward, {hidden.shape[1]} image + {text} text tokens: {fwd:.3f} s{scaled}")
    transformer = None  # noqa: F841  (frees its 41 GB before the VAE is built; `forward` is not called again)
    torch.cuda.empty_cache()

    vae = random_module(AutoencoderKLQwenImage, dev, dtype)
    image = torch.rand(1, 3, 1, side, side, device=dev, dtype=dtype, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 1, side // 8, side // 8, device=dev, dtype=dtype, generator=g)

    def encode():
        with torch.no_grad():
            vae.encode(image)

    def decode():
        with torch.no_grad():
            vae.decode(latent)

    enc, dec = cuda_seconds(encode), cuda_seconds(decode)
    print(f"VAE: encode {side}x{side} {enc:.3f} s, decode {dec:.3f} s")
    render = args.steps * 2 * fwd + args.controls * enc + dec
    print(f"one render ({args.steps} steps x 2 forwards, {args.controls} control image(s), text encoder left out): "
          f"{render:.1f} s")
    for where, figures in sets.items():
        for kind in ("png", "jpeg"):
            share = figures[kind] / render
            print(f"metric set share, metrics on {where}, {kind.upper()} preview: {share:.2%} "
                  f"(target under 1 %: {'met' if share < 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()
