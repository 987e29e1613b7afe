"""Peak resident memory of `parity run` on a CPU, per weight byte, at the real per-block sizes (issue 44).

    python bench/memory.py [--work DIR] [--blocks 5] [--layers 4] [--vision 4] [--threads 1] [--cap-gib 11.5]
    python bench/memory.py --tiny        (the same steps at the demo model's sizes: a dry run, seconds)

1. Builds a Qwen-Image transformer and a Qwen2.5-VL text encoder with random bf16 weights at the real per-block
   sizes (scripts/real_size.py's configurations: 3072 wide, 24 heads, MLP 12288; text 3584 wide, MLP 18944, 28/4
   heads; vision tower 1280 wide) but fewer blocks (`--blocks`, `--layers`, `--vision`) and the demo tokenizer's
   vocabulary, so the weights are 5-6 GiB, and saves it with save_pretrained (1 GB shards) as a complete diffusers
   folder with the demo checkpoint's tiny VAE, tokenizer, processor and scheduler, plus a random rank-16 LoRA on
   every block Linear in ai-toolkit's key format. Built in a child process, kept in `--work` between runs.
2. Makes two cases from the bundled text-to-image case `demo_qwen_image_lora` (no control image to encode): one
   sample at 256x256, 2 steps, its step-2 preview, the random LoRA as the step-2 checkpoint, training dtype bf16,
   `model:` the folder above; one with its base unquantized, one as ai-toolkit's UI default quantizes it
   (`quantize: true, qtype: qfloat8, quantize_te: true, qtype_te: qfloat8`).
3. Runs `python -m parity.cli run` on them, each configuration in a fresh process, and reads that process's peak
   resident memory (os.wait4's ru_maxrss, the kernel's VmHWM; /proc/PID/status and smaps_rollup are also
   sampled every 0.2 s for the anonymous and file-backed parts and the physical share, PSS):
   R1  reference only (bf16): `--training failed` with a threshold any image passes (`--ssim-min=-1`), so the
       reference render is the only one;
   R2  the qfloat8 case: the reference (bf16) and the training render (qfloat8 base, parity/precision.py);
   R3  R2 with `--explain all` (attribution's counterfactual renders, the precision switch among them).
   Each peak is divided by the weights' bytes on disk (bf16 transformer + text encoder + VAE). A child that grows
   past `--cap-gib` of physical memory (PSS) is stopped there (its figure is then a lower bound, and says so), so
   the bench never takes the machine. RSS counts a page of a file mapped twice (two pipelines loaded from one
   folder) twice; PSS once: both peaks are printed. So is the baseline: a process that only imports torch and
   the harness.

The last line reads `memory: reference R1 quantized R2 explain R3 (weights W GiB, device cpu)`.

Measured 2026-12-07 on the 2-core Intel Xeon (AVX512-BF16, AMX), one thread, the defaults (5.25 GiB of weights):
  every pipeline kept (before 342ee8e)          1.22  3.14  >= 3.22 (stopped at the PSS cap)
  one resident pipeline (342ee8e)               1.22  2.19  2.24
  quantizing frees as it goes (693fee6)         1.23  1.19  1.49
  and pipeline.release() trims the heap         1.23  1.19  1.25  (patched copy, --harness)
The bf16 peak is the weights themselves: from_pretrained maps the safetensors files and the render reads every
page (file-backed 5.25 GiB), plus 0.4 GiB of mapped libraries and 0.6 GiB of Python, torch and the harness (the
baseline, 1.07 GiB, is most of the 0.22 above 1). What went over: a second pipeline mapping the same files again
(counted twice in RSS, once in PSS); the quantized pipeline keeping its bf16 files mapped whole (a norm weight
left in each file) with every page quantizing read; glibc keeping the freed quantizing temporaries (1.1 GiB per
GiB of qfloat8 weights) and, after a release, the freed quantized weights (1.1-1.4 GiB) in its heap, under the
next pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CASE = ROOT / "cases" / "workspace" / "aitk" / "output" / "demo_qwen_image_lora"
CASE_NAME = CASE.name
DEMO = ROOT / "cases" / "workspace" / "aitk" / "demo-qwen-image-edit-2509"  # real_size.DEMO: tokenizer, VAE, ...
PREVIEW = "1796527221097__000000002_1.jpg"  # sample 1 at step 2 ("make the shapes blue", 256x256)
STEP = 2
GIB = 1 << 30
QFLOAT8 = dict(quantize=True, qtype="qfloat8", quantize_te=True, qtype_te="qfloat8")  # ai-toolkit's UI default
LAST_LINE = re.compile(r"^memory: reference (?P<R1>\d+\.\d\d) quantized (?P<R2>\d+\.\d\d) explain (?P<R3>\d+\.\d\d) "
                       r"\(weights (?P<W>\d+\.\d\d) GiB, device (?P<device>\w+)\)$")
BUILD_FILE = "bench-build.json"


# ---------------------------------------------------------------------------------------------------- the model
def sizes(tiny: bool, blocks: int, layers: int, vision: int) -> tuple[dict, dict, dict]:
    """(transformer, text, vision) overrides of real_size.configs: fewer blocks, the demo tokenizer's vocabulary."""
    demo_te = json.loads((DEMO / "text_encoder" / "config.json").read_text())
    full = sorted({*range(7, vision, 8), vision - 1}) if vision else []  # the real tower: every 8th block
    text = dict(num_hidden_layers=layers, layer_types=["full_attention"] * layers,
                vocab_size=demo_te["text_config"]["vocab_size"])
    return (dict(num_layers=blocks), text,
            dict(depth=vision, fullatt_block_indexes=full))


def build_model(folder: Path, tiny: bool, blocks: int, layers: int, vision: int) -> dict:
    """real_size.build_pipeline with fewer blocks, saved as a complete diffusers folder, plus a random rank-16 LoRA
    (`lora.safetensors`). Returns what was built (also written to `bench-build.json`)."""
    # scripts/real_size.py, the real configurations and the builder, imports torch: not at the top, so the measuring
    # parent stays small (a child's ru_maxrss starts at its parent's peak: measure())
    import real_size
    import torch

    transformer_kw, text_kw, vision_kw = sizes(tiny, blocks, layers, vision)
    real_configs = real_size.configs

    def fewer(tiny_: bool):
        t, te, vi, va = real_configs(tiny_)
        return {**t, **transformer_kw}, {**te, **text_kw}, {**vi, **vision_kw}, va

    torch.manual_seed(0)
    with mock.patch.object(real_size, "configs", fewer):
        pipe = real_size.build_pipeline(tiny, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    # 1 GB shards: safetensors serialises a shard into one buffer, so the save holds the weights plus one shard
    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size="1GB")
    pipe.text_encoder.save_pretrained(folder / "text_encoder", max_shard_size="1GB")
    for part in ("vae", "tokenizer", "processor", "scheduler"):
        shutil.copytree(DEMO / part, folder / part, dirs_exist_ok=True)
    # the case's pipeline (QwenImagePipeline, text to image): the bundled demo-qwen-image's index, same components
    shutil.copy(DEMO.parent / "demo-qwen-image" / "model_index.json", folder / "model_index.json")
    real_size.random_lora(pipe.transformer, folder / "lora.safetensors", rank=16)
    info = {"tiny": tiny, "blocks": blocks, "layers": layers, "vision": vision,
            "transformer_b": real_size.parameters(pipe.transformer),
            "text_encoder_b": real_size.parameters(pipe.text_encoder),
            "language_b": real_size.parameters(pipe.text_encoder.model.language_model),
            "vision_b": real_size.parameters(pipe.text_encoder.model.visual),
            "dtype": str(real_size.dtype_of(tiny)).removeprefix("torch.")}
    (folder / BUILD_FILE).write_text(json.dumps(info, indent=1))
    return info


def ensure_model(folder: Path, tiny: bool, blocks: int, layers: int, vision: int, in_process: bool = False) -> dict:
    """The built folder, reused when it was built with these settings; else built (in a child process unless
    `in_process`, so the builder's memory is gone before the measurements)."""
    want = {"tiny": tiny, "blocks": blocks, "layers": layers, "vision": vision}
    done = folder / BUILD_FILE
    if done.is_file():
        info = json.loads(done.read_text())
        if {k: info.get(k) for k in want} == want:
            return info
        shutil.rmtree(folder)
    if in_process:
        return build_model(folder, tiny, blocks, layers, vision)
    cmd = [sys.executable, __file__, "--_build", str(folder), "--blocks", str(blocks), "--layers", str(layers),
           "--vision", str(vision)] + (["--tiny"] if tiny else [])
    subprocess.run(cmd, check=True)
    return json.loads(done.read_text())


def weight_bytes(folder: Path) -> int:
    """The bf16 transformer + text encoder + VAE bytes on disk (the safetensors files)."""
    return sum(p.stat().st_size for part in ("transformer", "text_encoder", "vae")
               for p in (folder / part).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------- the cases
def make_case(root: Path, model: Path, quantized: bool, steps: int = 2, size: int = 256) -> Path:
    """The bundled text-to-image case, one sample at `size` px and `steps` steps, its step-2 preview, the random
    LoRA as the step-2 checkpoint, bf16 training, `model:` the built folder; the base qfloat8 when `quantized`."""
    import yaml

    case = root / CASE_NAME
    if case.exists():
        shutil.rmtree(case)
    (case / "samples").mkdir(parents=True)
    config = yaml.safe_load((CASE / "config.yaml").read_text())
    process = config["config"]["process"][0]
    process["train"]["dtype"] = "bf16"
    process["model"].update(QFLOAT8 if quantized else dict(quantize=False, quantize_te=False))
    sample = process["sample"]
    kept = dict(sample["samples"][1])
    for key in ("width", "height"):
        kept.pop(key, None)
    sample.update(samples=[kept], sample_steps=steps, width=size, height=size)
    (case / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    settings = {"model": str(model), "paths": {"/workspace": str(CASE.parent.parent.parent)}}
    (case / "parity.yaml").write_text("# bench/memory.py: the real-size folder with random weights\n"
                                      + yaml.safe_dump(settings, sort_keys=False))
    # sample 1 is the only one now: index 0
    shutil.copy(CASE / "samples" / PREVIEW, case / "samples" / PREVIEW.replace(f"{STEP:09d}_1", f"{STEP:09d}_0"))
    shutil.copy(model / "lora.safetensors", case / f"{CASE_NAME}_{STEP:09d}.safetensors")
    return case


# ---------------------------------------------------------------------------------------------------- measuring
@dataclass
class Peak:
    """One child process: its peak resident bytes (the kernel's), and from /proc samples what they were made of."""

    name: str
    maxrss: int = 0  # ru_maxrss of this child alone (os.wait4), bytes: VmHWM at exit
    sampled: int = 0  # the largest VmRSS seen by sampling
    anon: int = 0  # RssAnon at that sample: heap, quantized weights, activations
    file: int = 0  # RssFile at that sample: mapped files (safetensors weights mapped by from_pretrained, libraries)
    pss: int = 0  # the largest Pss seen (smaps_rollup): a file page mapped twice counts once, as in physical memory
    pss_anon: int = 0
    pss_file: int = 0
    seconds: float = 0.0
    rc: int | None = None
    capped: bool = False
    timeline: list = field(default_factory=list)  # (s, rss, rss anon, rss file, pss) where it moved
    output: str = ""
    errors: list = field(default_factory=list)  # the report's `error` rows: the run did not render what it should

    @property
    def ok(self) -> bool:
        return self.rc in (0, 1) and not self.capped and not self.errors

    def gib(self) -> float:
        return self.maxrss / GIB


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (/proc/PID/status) and Pss, Pss_Anon, Pss_File (smaps_rollup), bytes."""
    out = {}
    for name in ("status", "smaps_rollup"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss", "Pss_Anon", "Pss_File"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(name: str, cmd: list[str], env: dict[str, str], cap: int, log: Path | None = None,
            interval: float = 0.2, cwd: Path = ROOT) -> Peak:
    """Run `cmd` as a child and return its peak memory. Stopped (SIGKILL) once its physical share (Pss; RSS
    where smaps_rollup is missing) passes `cap`: RSS counts a file page twice when two pipelines map one file."""
    peak = Peak(name)
    hwm = [0]  # the child's own VmHWM, last sampled
    parent = status(os.getpid()).get("VmHWM", 0)
    out = open(log, "w") if log else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    done = threading.Event()

    def watch():
        while not done.is_set():
            s = status(proc.pid)
            rss, pss = s.get("VmRSS", 0), s.get("Pss", s.get("VmRSS", 0))
            hwm[0] = max(hwm[0], s.get("VmHWM", 0))
            if rss:
                t = time.perf_counter() - start
                last = peak.timeline[-1] if peak.timeline else None
                if last is None or abs(rss - last[1]) > 64 << 20 or abs(pss - last[4]) > 64 << 20 or t - last[0] > 5:
                    peak.timeline.append((round(t, 1), rss, s.get("RssAnon", 0), s.get("RssFile", 0), pss))
                if rss > peak.sampled:
                    peak.sampled, peak.anon, peak.file = rss, s.get("RssAnon", 0), s.get("RssFile", 0)
                if pss > peak.pss:
                    peak.pss, peak.pss_anon, peak.pss_file = pss, s.get("Pss_Anon", 0), s.get("Pss_File", 0)
                if pss > cap and not peak.capped:
                    peak.capped = True
                    os.kill(proc.pid, signal.SIGKILL)
            done.wait(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, code, usage = os.wait4(proc.pid, 0)  # this child's own rusage: peaks of earlier children do not mix in
    proc.returncode = os.waitstatus_to_exitcode(code)
    done.set()
    watcher.join()
    if log:
        out.close()
        peak.output = log.read_text(errors="replace")
    peak.seconds = time.perf_counter() - start
    # ru_maxrss (KiB) is the child's own peak, except that exec records the parent's peak there first (the mm it
    # leaves): when it is no more than that, the child stayed below its parent, and the sampled VmHWM says by how much
    maxrss = usage.ru_maxrss * 1024
    peak.maxrss = maxrss if maxrss > parent else max(hwm[0], peak.sampled)
    peak.rc = proc.returncode
    return peak


def baseline_cmd() -> list[str]:
    return [sys.executable, "-c", "import torch, parity.cli, parity.pipeline, parity.render"]


def run_cmd(case_root: Path, model: Path, report: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "parity.cli", "run", str(case_root), "--model", str(model), "--dtype", "bfloat16",
            "--device", "cpu", "--cache-dir", "", "--report-dir", str(report), "--no-progress", *extra]


RUNS = {
    "R1": ("bf16", ("--training", "failed", "--ssim-min=-1", "--explain", "none")),
    "R2": ("qfloat8", ("--training", "always", "--explain", "none")),
    "R3": ("qfloat8", ("--training", "always", "--explain", "all")),
}


def report_errors(report: Path) -> list[str]:
    """The reasons of the report's `error` rows (none: every preview was rendered and judged)."""
    try:
        records = json.loads((report / "parity.json").read_text())["records"]
    except (OSError, ValueError, KeyError):
        return ["no report written"]
    return [r.get("reason", "") for r in records if r.get("verdict") == "error"]


def summary(output: str) -> str:
    """The harness's own summary (renders made) or its last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    found = [line for line in lines if line.startswith("preview-parity:")]
    return (found or lines or ["(no output)"])[-1][:200]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def last_line(ratios: dict[str, float], weights_gib: float, device: str = "cpu") -> str:
    return (f"memory: reference {ratios['R1']:.2f} quantized {ratios['R2']:.2f} explain {ratios['R3']:.2f} "
            f"(weights {weights_gib:.2f} GiB, device {device})")


def parse_last_line(line: str) -> dict:
    m = LAST_LINE.match(line.strip())
    if not m:
        raise ValueError(f"not a bench/memory.py result line: {line!r}")
    return {**{k: float(m[k]) for k in ("R1", "R2", "R3", "W")}, "device": m["device"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None, help="keep the built model and the cases here between runs")
    p.add_argument("--blocks", type=int, default=5, help="transformer blocks (the real model has 60; 0.63 GiB each)")
    p.add_argument("--layers", type=int, default=4, help="text encoder layers (28 real; 0.43 GiB each)")
    p.add_argument("--vision", type=int, default=4, help="vision tower blocks (32 real; 0.04 GiB each)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("PARITY_THREADS", "1")))
    p.add_argument("--cap-gib", type=float, default=11.5,
                   help="stop a child whose physical share (PSS) passes this many GiB")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--tiny", action="store_true", help="the demo model's sizes (fp32): a dry run in seconds")
    p.add_argument("--harness", type=Path, default=ROOT,
                   help="the checkout whose parity package runs (e.g. `git archive COMMIT parity | tar -x -C DIR`: "
                        "the figures before a change)")
    p.add_argument("--_build", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._build is not None:
        build_model(args._build, args.tiny, args.blocks, args.layers, args.vision)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        return bench(args, work.resolve())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path) -> int:
    model = work / ("model-tiny" if args.tiny else "model")
    start = time.perf_counter()
    info = ensure_model(model, args.tiny, args.blocks, args.layers, args.vision)
    weights = weight_bytes(model)
    print(f"model: {model} ({time.perf_counter() - start:.0f} s): transformer {info['blocks']} of 60 blocks "
          f"({info['transformer_b']:.2f}B), text encoder {info['layers']} of 28 layers and {info['vision']} of 32 "
          f"vision blocks ({info['text_encoder_b']:.2f}B: language {info['language_b']:.2f}B, vision "
          f"{info['vision_b']:.2f}B), demo VAE; {info['dtype']} weights {weights / GIB:.2f} GiB on disk"
          + (" (--tiny: the demo sizes)" if args.tiny else ""), flush=True)
    cases = {kind: make_case(work / "cases" / kind, model, kind == "qfloat8") for kind in ("bf16", "qfloat8")}
    harness = args.harness.resolve()
    env = {**os.environ, "PARITY_THREADS": str(args.threads), "PYTHONPATH": str(harness)}
    cap = int(args.cap_gib * GIB)
    base = measure("baseline", baseline_cmd(), env, cap, cwd=harness)
    print(f"baseline (import torch and the harness, nothing loaded): {base.gib():.2f} GiB", flush=True)
    peaks: dict[str, Peak] = {}
    for name in args.runs:
        kind, extra = RUNS[name]
        report = work / "reports" / name
        shutil.rmtree(report, ignore_errors=True)
        report.mkdir(parents=True)
        peak = measure(name, run_cmd(cases[kind].parent, model, report, *extra), env, cap, report / "log.txt",
                       cwd=harness)
        peak.errors = report_errors(report)
        (report / "memory.json").write_text(json.dumps({k: v for k, v in peak.__dict__.items() if k != "output"}))
        peaks[name] = peak
        note = f"STOPPED at the {args.cap_gib} GiB cap: a lower bound; " if peak.capped else \
            (f"exit {peak.rc}; " if peak.rc not in (0, 1) else "")
        print(f"{name} {kind:<7} {' '.join(extra):<45} peak RSS {peak.gib():5.2f} GiB = {peak.maxrss / weights:.2f} x "
              f"weights ({(peak.maxrss - base.maxrss) / weights:.2f} x above the baseline; at the sampled peak "
              f"anonymous {peak.anon / GIB:.2f} + file-backed {peak.file / GIB:.2f} GiB); peak PSS "
              f"{peak.pss / GIB:.2f} GiB = {peak.pss / weights:.2f} x (anonymous {peak.pss_anon / GIB:.2f} + file "
              f"{peak.pss_file / GIB:.2f}); {peak.seconds:.0f} s; {note}{summary(peak.output)}", flush=True)
        for reason in peak.errors:
            print(f"   error: {reason[:600]}", flush=True)
        if peak.rc not in (0, 1) and not peak.capped:
            print(peak.output[-3000:], file=sys.stderr)
    print(f"CPU: {cpu_model()}, {args.threads} thread(s); harness {harness}; each run's log, report and /proc "
          f"timeline in {work / 'reports'}" + ("" if args.work else " (removed: give --work to keep them)"))
    ratios = {name: (peaks[name].maxrss / weights if name in peaks else float("nan")) for name in RUNS}
    print(last_line(ratios, weights / GIB))
    return 0 if all(p.ok for p in peaks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
