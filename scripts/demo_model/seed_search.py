"""Train the bundled demo model's recipe from several seeds side by side and bench each one.

    python scripts/demo_model/seed_search.py --seeds 1,2,3 --device cuda --work /tmp/seeds [--repeat 1]
        [--vae-from DIR] [--keep 2 --keep-dir DIR] [--deadline 540] [--screen 3 --first 1,11,4]

The recipe is the bundled checkpoint's: every argument in its `training.json` but the seed, threads and device,
with the stages of the README's command. Each seed trains in its own process (`train.py --seed S`) into
`<work>/seed-S`; as soon as one is assembled, `bench/demo_model.py` measures it on the same device (its
`--json` kept beside it). `--repeat S` trains seed S a second time (`<work>/seed-S-again`) and compares the two
checkpoints' weights, which tells whether training on that device is deterministic. `--vae-from DIR` starts every
run from DIR's VAE and text encoder and trains only the data and transformer stages, the seeds given as
`--transformer-seed` (the recipe's `--seed` kept), and each run's training.json records DIR's own record of those
stages under `vae_from`. At the end the seeds are
printed best first (edit accuracy, then the other figures' margins over their targets), and the best `--keep`
checkpoints (those that meet all four targets first) are packed as `<keep-dir>/seed-S.tar.gz` with their bench
figures, and every run's bench figures and logs as `<keep-dir>/runs.tar.gz`. Other arguments go to
train.py after the recipe's (a quick check: `--vae-steps 2 --scenes 4 ...`).
Processes still running at `--deadline` seconds are stopped (their seeds are reported as unfinished).
`--screen M [--first ROWS]` screens each run instead of benching it (`bench/demo_model.py --screen`: guidance-4
renders only, stopping at the M-th missed edit; minutes on a CPU where the whole bench takes most of an hour); with
the bench's 12 edits and M = 3 a run that finishes the screen meets the edit-accuracy target, and those are ranked
first and kept; their other three figures still need the whole bench.
The bench figures of a GPU run screen seeds; the README's are measured on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "cases/workspace/aitk/demo-qwen-image-edit-2509"
STAGES = "vae,colour,separate,encoder,data,transformer,more,long,assemble"
LATE_STAGES = "data,transformer,more,long,assemble"  # what --transformer-seed draws for
NOT_RECIPE = ("seed", "transformer_seed", "threads", "device")


def recipe_flags(training_json: Path) -> list[str]:
    """The training arguments of a checkpoint's `training.json` as train.py flags, less seed/threads/device."""
    arguments = json.loads(training_json.read_text())["arguments"]
    flags = []
    for name, value in arguments.items():
        if name in NOT_RECIPE or value is None:
            continue
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def start_from(checkpoint: Path, stage_work: Path, data_vae: str) -> None:
    """A work folder holding `checkpoint`'s VAE (as the stage folder the data stage encodes with) and text
    encoder, so that train.py runs only the data and transformer stages on them."""
    for part, stage in (("vae", "vae-separated" if data_vae == "separated" else "vae-colour"),
                        ("text_encoder", "text_encoder")):
        if not (stage_work / stage / "config.json").exists():
            shutil.copytree(checkpoint / part, stage_work / stage, dirs_exist_ok=True)


PROVENANCE = ("seed", "threads", "torch", "machine", "cpu", "device")


def note_vae_source(run: Path, checkpoint: Path) -> None:
    """Record in `run`'s training.json where its VAE and text encoder came from: under `vae_from`, the
    checkpoint's own record of them (seed, machine and the VAE, colour, separate and encoder stages' figures,
    which a run of the late stages alone does not make), so that a run bundled as is still says how every part
    of it was made."""
    record = json.loads((run / "training.json").read_text())
    source = json.loads((checkpoint / "training.json").read_text())
    record["vae_from"] = source.get("vae_from") or {  # a run from a run: the VAE's first record
        "checkpoint": checkpoint.name, **{k: v for k, v in source.items() if k in PROVENANCE or k not in record}}
    (run / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def weights_digest(model: Path) -> str:
    """One digest of every safetensors file of a diffusers folder (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(model.rglob("*.safetensors")):
        h.update(str(path.relative_to(model)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


TARGETS = {"edit_accuracy": 0.8, "resemblance": 0.6, "guidance_effect": 8.0, "cfg_norm_over_floor": 10.0}  # the bench's


def rank(figures: dict) -> tuple:
    """Sort key: all four targets met, then edit accuracy, then the smallest figure-over-target ratio."""
    met = all(figures[k] >= v for k, v in TARGETS.items())
    return (met, figures["edit_accuracy"], min(figures[k] / v for k, v in TARGETS.items()))


def describe(result: dict) -> str:
    """One line of a run's bench figures (`all four met` when they are) or of its screen."""
    if "judged" in result:
        return (f"screen {result['right']} right of {result['judged']}, missed rows {result['missed']}"
                + ("  edit accuracy met (every edit judged)" if result["complete"] else ""))
    return " ".join(f"{k} {v:.3f}" for k, v in result.items()) + ("  all four met" if rank(result)[0] else "")


def screen_rank(result: dict) -> tuple:
    """Sort key of a screen: every edit judged before the M-th miss, then the share right of those judged."""
    return (result["complete"], result["right"] / max(result["judged"], 1), result["judged"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", required=True, help="comma-separated seeds")
    p.add_argument("--repeat", type=int, default=None, help="train this seed twice and compare the weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each process")
    p.add_argument("--work", required=True, help="where each seed's checkpoint, stages and logs go")
    p.add_argument("--recipe", default=str(BUNDLED / "training.json"), help="training.json whose arguments to use")
    p.add_argument("--vae-from", default=None,
                   help="a checkpoint (the bundled one, say) whose VAE and text encoder every run starts from: then "
                        "the seeds are --transformer-seed (data and transformer stages) and --seed is the recipe's")
    p.add_argument("--keep", type=int, default=0, help="pack this many of the best passing checkpoints")
    p.add_argument("--keep-dir", default=None)
    p.add_argument("--deadline", type=float, default=None, help="seconds after which running processes stop")
    p.add_argument("--bench-count", type=int, default=12, help="the bench's --count")
    p.add_argument("--bench-steps", type=int, default=25, help="the bench's --steps")
    p.add_argument("--screen", type=int, default=None, metavar="M",
                   help="screen each run (the bench's --screen M: guidance-4 renders, stop at the M-th miss) "
                        "instead of the whole bench")
    p.add_argument("--first", default="", help="with --screen: the rows to render first (the bench's --first)")
    args, extra = p.parse_known_args(argv)  # anything else goes to train.py after the recipe's flags
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = recipe_flags(Path(args.recipe)) + extra
    runs = [(s, f"seed-{s}") for s in map(int, args.seeds.split(","))]
    if args.repeat is not None:
        runs.append((args.repeat, f"seed-{args.repeat}-again"))
    start = time.time()
    training, benching, done = {}, {}, {}
    recipe = json.loads(Path(args.recipe).read_text())["arguments"]
    for seed, name in runs:
        seeds, stages = ["--seed", str(seed)], STAGES
        if args.vae_from:
            stages = LATE_STAGES
            seeds = ["--seed", str(recipe["seed"]), "--transformer-seed", str(seed)]
            start_from(Path(args.vae_from), work / f"{name}.work", recipe["data_vae"])
        cmd = [sys.executable, str(REPO / "scripts/demo_model/train.py"), "--out", str(work / name),
               "--work", str(work / f"{name}.work"), *seeds, "--threads", str(args.threads),
               "--device", args.device, "--stages", stages, *flags]
        training[name] = subprocess.Popen(cmd, stdout=open(work / f"{name}.train.log", "w"), stderr=subprocess.STDOUT)
    print(f"training {len(runs)} runs: {' '.join(flags)}", flush=True)
    kind = "screen" if args.screen is not None else "bench"
    judge = (["--screen", str(args.screen)] + (["--first", args.first] if args.first else [])
             if args.screen is not None else [])
    while training or benching:
        time.sleep(2)
        elapsed = time.time() - start
        for name, proc in list(training.items()):
            if proc.poll() is None:
                continue
            del training[name]
            print(f"{elapsed:5.0f} s  {name} trained (exit {proc.returncode})", flush=True)
            if proc.returncode == 0 and args.vae_from:
                note_vae_source(work / name, Path(args.vae_from))
            if proc.returncode == 0:
                cmd = [sys.executable, str(REPO / "bench/demo_model.py"), "--model", str(work / name),
                       "--device", args.device, "--threads", str(args.threads), "--count", str(args.bench_count),
                       "--steps", str(args.bench_steps), *judge,
                       "--json", str(work / f"{name}.{kind}.json")]
                benching[name] = subprocess.Popen(cmd, stdout=open(work / f"{name}.{kind}.log", "w"),
                                                  stderr=subprocess.STDOUT)
        for name, proc in list(benching.items()):
            if proc.poll() is None:
                continue
            del benching[name]
            result = work / f"{name}.{kind}.json"
            if proc.returncode == 0 and result.exists():
                done[name] = json.loads(result.read_text())["screen" if args.screen is not None else "figures"]
                print(f"{elapsed:5.0f} s  {name} {kind}ed: {describe(done[name])}", flush=True)
            else:
                print(f"{elapsed:5.0f} s  {name} {kind} failed (exit {proc.returncode})", flush=True)
        if args.deadline and elapsed > args.deadline:
            for name, proc in {**training, **benching}.items():
                proc.kill()
                print(f"{elapsed:5.0f} s  {name} stopped at the deadline", flush=True)
            break
    print(f"\nseed run, {kind} figures (device " + args.device + "), best first:")
    best = sorted(done, key=lambda n: (screen_rank if args.screen is not None else rank)(done[n]), reverse=True)
    for name in best:
        print(f"  {name:16s} {describe(done[name])}")
    for seed, name in runs:
        if name not in done:
            print(f"  {name:16s} unfinished (see {work / (name + '.train.log')})")
    if args.repeat is not None:
        pair = [work / f"seed-{args.repeat}", work / f"seed-{args.repeat}-again"]
        if all((m / "model_index.json").exists() for m in pair):
            digests = [weights_digest(m) for m in pair]
            print(f"seed {args.repeat} twice: weights {'identical' if digests[0] == digests[1] else 'DIFFERENT'} "
                  f"({digests[0]} / {digests[1]})")
    if args.keep and args.keep_dir:
        keep = Path(args.keep_dir)
        keep.mkdir(parents=True, exist_ok=True)
        for name in [n for n in best if not n.endswith("-again")][: args.keep]:
            with tarfile.open(keep / f"{name}.tar.gz", "w:gz") as tar:
                tar.add(work / name, arcname=name)
                tar.add(work / f"{name}.{kind}.json", arcname=f"{name}.{kind}.json")
            print("kept", keep / f"{name}.tar.gz")
        with tarfile.open(keep / "runs.tar.gz", "w:gz") as tar:
            for path in sorted(work.glob("*.log")) + sorted(work.glob(f"*.{kind}.json")):
                tar.add(path, arcname=path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
