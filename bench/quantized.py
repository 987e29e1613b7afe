"""What a quantized training base costs: time and peak memory, quantized side by side with bf16, on this CPU.

1. The bundled quantized cases (qfloat8; uint3 + ARA, both with a qfloat8 text encoder): each measured in a
   fresh process, so peak memory is that run's own: the pipeline loaded in bf16 and rendered (the reference's
   base), loaded and quantized with an empty quantized-weights cache and rendered, and loaded again from that
   cache (a second run: nothing is quantized again).
2. A slice of the real transformer: `--blocks` blocks of Qwen-Image's real width (3072 wide, 24 heads, MLP 12288;
   the real model has 60 of them, 20.4B parameters), random weights in bf16, quantized as the harness quantizes
   the real one (one Linear at a time, in place), then every weight read once; then again from the
   quantized-weights cache. Its time per block and its peak memory above the weights give the estimate for the
   real 60-block transformer.

Run: python bench/quantized.py [--cases cases] [--blocks 2]   (PARITY_THREADS sets the CPU threads, default 1)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("demo_qwen_edit_plus_qfloat8", "demo_qwen_edit_plus_uint3_ara")
REAL_BLOCKS = 60
REAL_PARAMETERS = 20.4e9
MIB = 1 << 20
# glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap, where they still count as resident:
# the block children allocate every buffer over 64 KiB with mmap, so a freed layer leaves the count and the peak
# is the memory actually live
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory() -> dict[str, int]:
    """Resident and peak resident bytes of this process (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return {"rss": out["VmRSS"], "peak": out["VmHWM"]}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident size


def case_child(cases: Path, name: str, mode: str, cache_dir: str) -> dict:
    """Load the case's training recipe (step 2, LoRA at run time) on a bf16 or quantized base and render it."""
    from parity import pipeline, render
    from parity.runner import Options, plan, set_threads

    set_threads()
    task = [t for t in plan(Options(cases=(cases,), device="cpu", metrics=())) if t.case == name][-1]
    recipe = task.training if mode != "bf16" else task.training.with_fields(precision="none", ara_file=None)
    before = memory()
    reset_peak()
    start = time.perf_counter()
    loaded = pipeline.load_for(recipe, task.model, "cpu", cache_dir=cache_dir or None)
    load_s = time.perf_counter() - start
    after_load = memory()
    start = time.perf_counter()
    render.render(loaded, recipe)
    render_s = time.perf_counter() - start
    return {"load_s": load_s, "quantize_s": loaded.quantize_seconds, "render_s": render_s, "layers": loaded.quantized,
            "load_peak": after_load["peak"] - before["rss"], "peak": memory()["peak"] - before["rss"]}


def block_child(qtype: str, blocks: int, cache_dir: str = "") -> dict:
    """Quantize `blocks` real-width transformer blocks as precision.quantize_transformer does the real model
    (with `cache_dir`: through the quantized-weights cache, saved there when missing, else read from it)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from parity.cache import open_cache
    from parity.precision import Precision, quantize_transformer
    from parity.runner import set_threads

    set_threads()
    torch.manual_seed(0)
    with torch.no_grad():
        model = QwenImageTransformer2DModel(num_layers=blocks).to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    before = memory()
    reset_peak()
    start = time.perf_counter()
    cache = open_cache(cache_dir) if cache_dir else None
    layers = quantize_transformer(model, Precision(transformer=qtype), None, cache, {"bench blocks": blocks})
    for tensor in model.state_dict().values():  # read every weight once: cached ones may be mapped, not yet read
        tensor.contiguous().view(-1).view(torch.uint8).max()
    seconds = time.perf_counter() - start
    after = memory()
    return {"seconds": seconds, "layers": layers, "weights": weights, "largest_layer": largest,
            "extra_peak": after["peak"] - before["rss"], "resident_change": after["rss"] - before["rss"]}


def child(*args: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=Path("cases"))
    parser.add_argument("--blocks", type=int, default=2, help="real-width blocks to quantize (about 0.7 GB each)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = case_child(args.cases, *rest) if kind == "case" else block_child(rest[0], int(rest[1]), *rest[2:])
        print(json.dumps(result))
        return

    print("1. bundled quantized cases, training render of the step-2 preview (1024x1024, 4 steps, LoRA at run time)")
    print(f"{'case':<32} {'base':<18} {'load s':>7} {'quantize s':>10} {'render s':>9} {'peak MiB':>9} {'layers':<40}")
    for name in CASES:
        with tempfile.TemporaryDirectory() as cache:
            runs = {"bf16": child("case", name, "bf16", ""),
                    "quantized (cold)": child("case", name, "quantized", cache),
                    "quantized (cached)": child("case", name, "quantized", cache)}
        for mode, r in runs.items():
            print(f"{name:<32} {mode:<18} {r['load_s']:>7.2f} {r['quantize_s']:>10.3f} {r['render_s']:>9.2f} "
                  f"{r['peak'] / MIB:>9.0f} "
                  f"{json.dumps(r['layers']):<40}")
        plain, cold, cached = runs.values()
        print(f"{'':<32} ratios: quantized/bf16 render {cold['render_s'] / plain['render_s']:.2f}, peak memory "
              f"{cold['peak'] / plain['peak']:.2f}; cached/cold quantize {cached['quantize_s'] / cold['quantize_s']:.2f}")

    print(f"\n2. real-width transformer blocks (Qwen-Image: 3072 wide, MLP 12288), bf16, one Linear at a time in place")
    print(f"{'qtype':<15} {'blocks':>6} {'layers':>6} {'weights MiB':>11} {'seconds':>8} {'s/block':>8} "
          f"{'peak above MiB':>14} {'largest layer MiB':>17} {'peak/weights':>12} {'after/before':>12}")
    estimates = []
    for qtype in ("qfloat8", "uint3"):
        with tempfile.TemporaryDirectory() as cache:
            runs = [("", 1, child("block", qtype, "1", env=LIVE_MEMORY)),
                    ("", args.blocks, child("block", qtype, str(args.blocks), cache, env=LIVE_MEMORY)),
                    (" cached", args.blocks, child("block", qtype, str(args.blocks), cache, env=LIVE_MEMORY))]
        for how, blocks, r in runs:
            per_block = r["seconds"] / blocks
            print(f"{qtype + how:<15} {blocks:>6} {r['layers']:>6} {r['weights'] / MIB:>11.0f} {r['seconds']:>8.1f} "
                  f"{per_block:>8.1f} {r['extra_peak'] / MIB:>14.0f} {r['largest_layer'] / MIB:>17.0f} "
                  f"{r['extra_peak'] / r['weights']:>12.3f} {(r['weights'] + r['resident_change']) / r['weights']:>12.2f}")
        (_, _, one), (_, _, r), (_, _, cached) = runs
        per_block = r["seconds"] / args.blocks
        after = (r["weights"] + r["resident_change"]) / r["weights"]
        estimates.append(f"{qtype}: about {per_block * REAL_BLOCKS / 60:.0f} min on this CPU ({per_block:.1f} s x "
                         f"{REAL_BLOCKS} blocks); peak above the weights about {r['extra_peak'] / MIB:.0f} MiB (it "
                         f"does not grow with the blocks: one layer at a time), weights after "
                         f"{after * REAL_PARAMETERS * 2 / (1 << 30):.0f} GiB; from the cache "
                         f"{cached['seconds'] / r['seconds']:.2f} of that time")
    print(f"\nreal transformer ({REAL_BLOCKS} blocks, 20.4B parameters, bf16 weights "
          f"{REAL_PARAMETERS * 2 / (1 << 30):.0f} GiB), estimated from the largest slice above:")
    for line in estimates:
        print("  " + line)


if __name__ == "__main__":
    main()
