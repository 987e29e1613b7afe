"""`parity run PATH...`: what `pytest parity/` does, without pytest (the same options: `parity.options`).

Also `parity explain` (attribution for every preview, with the measured noise floor), `parity requests` (the
reference server's request for each preview, as JSON lines), `parity workflow` (a ComfyUI graph per preview, of
stock nodes, as close to it as they allow) and `parity merge-reports`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import expectations
from . import options as table
from .options import OptionError
from .interrupt import stop_on_sigterm
from .runner import Checker, plan, run, set_threads, summary_line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="parity", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="regenerate every preview of the cases under PATH and write the reports",
                           description="Regenerate every preview of the cases under PATH with the reference "
                                       "pipeline, compare, explain, and write the reports. Every option is also "
                                       "a `pytest parity/` flag (--parity-<name>) and ini key (parity_<name>).")
    p_run.add_argument("paths", nargs="+", metavar="PATH", help="case folders or folders holding them")
    table.add_to_argparse(p_run)
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar (one line per preview instead)")
    p_explain = sub.add_parser("explain", help="which recipe difference explains each preview's gap")
    p_explain.add_argument("paths", nargs="+", metavar="PATH", help="a case folder (or folders holding cases)")
    p_explain.add_argument("--preview", default=None, help="only this preview file name")
    p_explain.add_argument("--no-measured-floor", action="store_true",
                           help="do not measure the noise floor (math vs fused attention kernel)")
    table.add_to_argparse(p_explain, skip=("explain", "noise_floor"))
    p_req = sub.add_parser("requests", help="the reference server's request for each preview (JSON lines)",
                           description="For each preview, the ai-toolkit-inference request that reproduces it as "
                                       "closely as the server allows, and the differences that will remain.")
    p_req.add_argument("paths", nargs="+", metavar="PATH", help="case folders or folders holding them")
    p_req.add_argument("--images", choices=("base64", "path"), default="base64",
                       help="control images inline as base64 (default), or as local paths for a shared disk")
    p_req.add_argument("--out", type=Path, default=None, help="write the JSON lines here (default: standard output)")
    p_req.add_argument("--fixed", action="store_true",
                       help="render each request here and apply the smallest request change (guidance scale, "
                            "network multiplier) whose render passes the case's thresholds; each line's `fix` says "
                            "what changed and what its render measured")
    for name in ("model", "dtype", "device", "cache_dir", "metric"):
        setting = table.BY_NAME[name]
        p_req.add_argument(setting.cli_flag, dest=name, default=None, help=setting.help)
    p_wf = sub.add_parser("workflow", help="a ComfyUI graph per preview, of stock nodes, as close to it as they allow",
                          description="For each preview, render the stock ComfyUI graphs reachable from the model's "
                                      "official template (shift node, CFGNorm, image scaling) with the ComfyUI "
                                      "recipe, keep the closest, and write it in API and UI form with a note of its "
                                      "distance, the template's, and what stock nodes cannot match.")
    p_wf.add_argument("paths", nargs="+", metavar="PATH", help="case folders or folders holding them")
    p_wf.add_argument("--out", type=Path, default=Path("reports") / "workflows", help="where the graphs go")
    for flag, what in (("--unet", "diffusion model"), ("--clip", "text encoder"), ("--vae", "VAE")):
        p_wf.add_argument(flag, default=None, help=f"the {what} file name in your ComfyUI (default: the name "
                                                   f"scripts/record-comfyui gives the case's model)")
    for name in ("model", "dtype", "device", "cache_dir", "metric"):
        setting = table.BY_NAME[name]
        p_wf.add_argument(setting.cli_flag, dest=name, default=None, help=setting.help)
    p_merge = sub.add_parser("merge-reports", help="one CSV, JSON and HTML report from shard report folders")
    p_merge.add_argument("dirs", nargs="+", type=Path, help="report folders written by sharded runs")
    p_merge.add_argument("--out", type=Path, default=Path("reports"))
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "merge-reports":
        from .merge import merge_reports

        paths = merge_reports(args.dirs, args.out)
        print(f"merged {len(args.dirs)} report folders -> {paths['html']}")
        return 0
    if args.command in ("requests", "workflow"):
        try:
            options = table.from_argparse(args, **({"reference": "comfyui"} if args.command == "workflow" else {}))
        except OptionError as exc:
            top.error(str(exc))
        return requests(args, options) if args.command == "requests" else workflows(args, options)
    try:
        if args.command == "explain":
            options = table.from_argparse(args, explain="all", noise_floor=not args.no_measured_floor)
        else:
            options = table.from_argparse(args)
    except OptionError as exc:
        top.error(str(exc))
    set_threads()
    stop_on_sigterm()
    if args.command == "explain":
        return explain(args, options)
    tasks = plan(options)
    progress = Progress(len(tasks), bar=not args.no_progress)
    try:
        records = run(options, tasks, progress=progress)
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: the report of what was done is in {options.report_dir / 'index.html'}; run the same "
              f"command again to finish (finished renders come from the cache)", file=sys.stderr)
        return 130
    progress.close()
    sources = {t.id: t.expect.source for t in tasks if t.expect}
    for r in records:
        unexpected = expectations.problem(r, sources.get(r["id"]))
        if unexpected:
            print(f"{r['verdict']:<24} {unexpected}")
        elif r.get("expected_outcome") == expectations.EXPECTED:
            print(f"{r['verdict'] + ' (expected)':<24} {r['id']}  {r['expected_reason']}")
        elif r["verdict"] not in expectations.PASSING:
            print(f"{r['verdict']:<24} {r['id']}  {r['reason']}")
    print(summary_line(records), f"-> {options.report_dir / 'index.html'}")
    return 0 if all(expectations.passes(r) for r in records) else 1


class Progress:
    """A progress bar (tqdm) with the current preview, renders made and an ETA; one line per preview
    instead when the bar is off or the output is not a terminal."""

    def __init__(self, total: int, bar: bool = True):
        from tqdm import tqdm

        self.total, self.count, self.renders = total, 0, 0
        self.bar = tqdm(total=total, unit="preview", dynamic_ncols=True, file=sys.stderr) \
            if bar and sys.stderr.isatty() else None
        self.started = time.perf_counter()

    def start(self, task) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{task.id} | {self.renders} renders made", refresh=True)

    def done(self, task, record: dict) -> None:
        self.count += 1
        self.renders += record.get("renders") or 0
        if self.bar is not None:
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.count * (self.total - self.count)
        seconds = record.get("check_seconds")
        took = f"{seconds:.1f}s" if isinstance(seconds, (int, float)) else "-"
        print(f"[{self.count}/{self.total}] {record['verdict']:<24} {took:>7}  {task.id}  "
              f"({self.renders} renders made, ETA {eta:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def requests(args, options) -> int:
    """`parity requests`: JSON lines to --out or standard output; previews without recipes on standard error."""
    from .engines.server.requests import write

    tasks = plan(options)
    fix = None
    if args.fixed:
        set_threads()
        from dataclasses import replace

        checker = Checker(replace(options, metrics=()))  # distances only: no perceptual network to load
        fix = checker.prescribe
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        written, problems = write(tasks, out, args.images, fix)
    finally:
        if args.out:
            out.close()
    for problem in problems:
        print(f"no request: {problem}", file=sys.stderr)
    print(f"{written} requests" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0 if written and not [t for t in tasks if t.error and "skipped" not in t.notes] else 1


def workflows(args, options) -> int:
    """`parity workflow`: per preview, the closest stock graph (engines/comfyui/export.py) in --out/<case>/."""
    from dataclasses import replace

    from .attribution import distance
    from .engines.comfyui import export
    from .preview_file import open_preview, preview_encoder

    set_threads()
    checker = Checker(replace(options, metrics=()))
    tasks = plan(options)
    for task in tasks:
        if task.error or task.reference is None:
            print(f"no graph: {task.id}: {task.error or 'no recipe'}", file=sys.stderr)
            continue
        preview, encode = open_preview(task.preview), preview_encoder(task.preview)
        choice = export.choose(task.reference, task.training, lambda r: distance(
            preview, checker.render(r, task.model)[0], encode, options.metric))
        names = export.default_names(task.model, task.reference.control_images_vae)
        names = replace(names, **{k: getattr(args, k) for k in ("unet", "clip", "vae") if getattr(args, k)})
        note = export.write(choice, task.training, names, args.out / task.case, task.preview.stem)
        print(f"{task.id}: {note['chosen']}: {options.metric} {choice.distance:.4g} (template "
              f"{choice.template_distance:.4g}) -> {args.out / task.case / task.preview.stem}.api.json")
    return 0


def shown(distance: float | None) -> str:
    """A distance as `explain` prints it; None is what JSON keeps of infinity (the render's size differs)."""
    return "another size" if distance is None else f"{distance:.4f}"


def explain(args, options) -> int:
    tasks = [t for t in plan(options) if args.preview is None or (t.preview and t.preview.name == args.preview)]
    if not tasks:
        print(f"no preview named {args.preview!r} under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    for r in run(options, tasks):
        print(f"{r['id']}  ({r['preview']}): {r['verdict']}")
        if not r.get("causes"):
            print(f"  {r['reason'] or 'no differing recipe fields'}")
            continue
        data = json.loads(r["causes"])
        if data.get("unavailable"):
            print(f"  attribution not measured: {data['unavailable']}")
            continue
        print(f"  {data['metric']}: reference {shown(data['reference_distance'])}, training "
              f"{shown(data['training_distance'])}, gap {shown(data['gap'])}, noise floor {data['floor']:.4f}")
        if data["gap"] is not None and data["gap"] <= data["floor"]:
            print("  the gap is within the noise floor: no recipe difference can be blamed for it")
        for c in data["causes"]:
            name = "+".join(c["fields"])
            if not c["testable"]:
                print(f"    {name:<40} not testable: {c['reason']}")
            elif c["share"] is None:
                print(f"    {name:<40} distance {shown(c['distance'])} (no gap to explain)")
            else:
                rev = "" if c["reverse_distance"] is None else \
                    f", training recipe with the reference value: {shown(c['reverse_distance'])}"
                print(f"    {name:<40} closes {c['share']:7.1%} (distance {shown(c['distance'])}{rev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
