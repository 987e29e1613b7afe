"""What the harness costs against the bare pipeline, side by side in one process on one device.

For N bundled previews, a person checking them by hand renders two images each with the stock Diffusers pipeline:
the reference request (what the server answers) and the training request (what ai-toolkit did, to see whether the
preview can be reproduced at all). This script times exactly that, as a user runs it: one `__call__` of the stock
pipeline class of the preview's model (`QwenImageEditPlusPipeline` for the bundled 2509 runs) per request, with
its preprocessing, prompt encoding, control-image encoding, denoising and decoding, and the image saved. Loading
the pipeline and the LoRA files happens before the clock starts, for both sides.

The harness checks the same previews with `run()` (renders, metrics, maps, findings, the report) from an empty
render cache, in its regression mode `--parity-training failed`: the training recipe is rendered only for a
preview whose reference comparison fails, and control-image latents and prompt embeddings are computed once and
shared by every render that needs them. `--training always` measures the diagnosis mode as well (both recipes
rendered for every preview, as the bare baseline does).

Run: python bench/harness_vs_bare.py [--case demo_qwen_image_edit_plus_lora_v1] [--limit 6] [--dtype float32]
     [--device cpu] [--training failed always]     (PARITY_THREADS sets the CPU threads, default 1)
Last line: harness/bare R (harness H s, bare B s, N renders, device D, dtype T)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity import pipeline  # noqa: E402
from parity.models import by_name  # noqa: E402
from parity.runner import Options, plan, run  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def bare_call(pipe, recipe):
    """The stock pipeline's __call__ for one request, as a user writes it."""
    from PIL import Image

    kwargs = dict(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, true_cfg_scale=recipe.guidance,
                  num_inference_steps=recipe.steps, height=recipe.height, width=recipe.width,
                  generator=torch.Generator(recipe.generator_device).manual_seed(recipe.seed))
    images = [Image.open(p).convert("RGB") for p in recipe.control_images_vae]
    if type(pipe).__name__ == "QwenImageEditPlusPipeline":
        kwargs["image"] = images
    elif type(pipe).__name__ == "QwenImageEditPipeline":
        kwargs["image"] = images[0]
    return pipe(**kwargs).images[0]


class Bare:
    """Stock pipelines, one per (model folder, class), with each LoRA file loaded once as a PEFT adapter."""

    def __init__(self, device: str, dtype: str):
        self.device, self.dtype, self.pipes, self.adapters = device, pipeline.DTYPES[dtype], {}, {}

    def prepare(self, model: str, recipe):
        import diffusers

        cls = by_name(recipe.model).pipeline
        if (model, cls) not in self.pipes:
            pipe = getattr(diffusers, cls).from_pretrained(model, torch_dtype=self.dtype).to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[(model, cls)] = pipe
        pipe = self.pipes[(model, cls)]
        if recipe.lora:
            name = self.adapters.setdefault((model, cls, recipe.lora), f"lora{len(self.adapters)}")
            if name not in getattr(pipe.transformer, "peft_config", {}):
                p = Path(recipe.lora)
                pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name)
            pipe.enable_lora()
            pipe.set_adapters([name], [recipe.multiplier])
        elif getattr(pipe.transformer, "peft_config", None):
            pipe.disable_lora()
        return pipe

    def time(self, model: str, recipe, out: Path) -> float:
        pipe = self.prepare(model, recipe)
        sync(self.device)
        start = time.perf_counter()
        bare_call(pipe, recipe).save(out)
        sync(self.device)
        return time.perf_counter() - start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def harness(tasks, options: Options) -> tuple[float, int]:
    for t in tasks:  # loading is outside the clock, as for the bare side
        pipeline.load_for(t.reference, t.model, options.device, cache_dir=options.cache_dir)
    sync(options.device)
    start = time.perf_counter()
    records = run(options, tasks)
    sync(options.device)
    return time.perf_counter() - start, sum(int(r.get("renders") or 0) for r in records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=Path, default=ROOT / "cases")
    p.add_argument("--case", default="demo_qwen_image_edit_plus_lora_v1", help="bundled case (folder name)")
    p.add_argument("--limit", type=int, default=6, help="previews checked (the first N of the case)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--training", nargs="+", default=["failed"], choices=["failed", "always"],
                   help="harness modes measured (the last one is the last line's)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Options(cases=(args.cases,), device=args.device, dtype=args.dtype)
        tasks = [t for t in plan(base) if t.case == args.case and t.reference is not None][:args.limit]
        if not tasks:
            raise SystemExit(f"no renderable preview of {args.case!r} under {args.cases}")
        print(f"{len(tasks)} previews of {args.case}, {args.dtype} on {args.device} ({cpu_name()}), "
              f"{torch.get_num_threads()} thread(s)", flush=True)

        bare, bare_seconds, renders = Bare(args.device, args.dtype), 0.0, 0
        bare.time(tasks[0].model, tasks[0].reference, tmp / "warm-up.png")  # kernels' first-use costs, for both
        for i, t in enumerate(tasks):
            for side, recipe in (("reference", t.reference), ("training", t.training)):
                seconds = bare.time(t.model, recipe, tmp / f"bare-{i}-{side}.png")
                bare_seconds += seconds
                renders += 1
                print(f"  bare {t.id} {side}: {seconds:.2f} s", flush=True)
        print(f"bare: {bare_seconds:.1f} s for {renders} renders ({bare_seconds / renders:.2f} s each)")
        del bare

        line = ""
        for mode in args.training:
            options = Options(cases=(args.cases,), device=args.device, dtype=args.dtype, training=mode,
                              report_dir=tmp / f"report-{mode}", cache_dir=tmp / f"cache-{mode}")
            seconds, made = harness(tasks, options)
            ratio = seconds / bare_seconds
            print(f"harness --parity-training {mode}: {seconds:.1f} s, {made} renders made "
                  f"(renders, metrics, maps, report)", flush=True)
            line = (f"harness/bare {ratio:.2f} (harness {seconds:.1f} s, bare {bare_seconds:.1f} s, {renders} renders, "
                    f"device {args.device}, dtype {args.dtype})")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
