"""`parity run PATH...`: what `pytest parity/` does, without pytest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .runner import DEFAULT_THRESHOLDS, Options, plan, run, set_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="regenerate every preview of the cases under PATH and write the reports")
    p_run.add_argument("paths", nargs="+", type=Path, help="case folders or folders holding them")
    p_run.add_argument("--report-dir", type=Path, default=Path("reports"))
    p_run.add_argument("--report-images", default="compact", choices=["compact", "lossless"],
                       help="compact: full-size WebP (default); lossless: full-size PNG")
    p_run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p_run.add_argument("--dtype", default="bfloat16")
    p_run.add_argument("--model", default=None, help="hub id or diffusers folder for every case")
    p_run.add_argument("--cache-dir", type=Path, default=Path(".parity-cache"))
    p_run.add_argument("--ssim-min", type=float, default=DEFAULT_THRESHOLDS["ssim_min"])
    p_explain = sub.add_parser("explain", help="which recipe difference explains each preview's gap")
    p_explain.add_argument("paths", nargs="+", type=Path, help="a case folder (or folders holding cases)")
    p_explain.add_argument("--preview", default=None, help="only this preview file name")
    p_explain.add_argument("--report-dir", type=Path, default=Path("reports"))
    p_explain.add_argument("--report-images", default="compact", choices=["compact", "lossless"],
                       help="compact: full-size WebP (default); lossless: full-size PNG")
    p_explain.add_argument("--device", default=None)
    p_explain.add_argument("--dtype", default="bfloat16")
    p_explain.add_argument("--model", default=None)
    p_explain.add_argument("--cache-dir", type=Path, default=Path(".parity-cache"))
    p_explain.add_argument("--metric", default="mean_abs", choices=["mean_abs", "max_abs", "ssim", "psnr"])
    p_explain.add_argument("--floor", type=float, default=0.0,
                           help="noise floor of the metric (default: measured, math vs fused attention kernel)")
    p_explain.add_argument("--no-measured-floor", action="store_true", help="do not measure the noise floor")
    p_explain.add_argument("--reverse", action="store_true",
                           help="also render the training recipe with each reference value (what to change at "
                                "inference to get the preview back)")
    p_merge = sub.add_parser("merge-reports", help="one CSV, JSON and HTML report from shard report folders")
    p_merge.add_argument("dirs", nargs="+", type=Path, help="report folders written by sharded runs")
    p_merge.add_argument("--out", type=Path, default=Path("reports"))
    p_run.add_argument("--shard", default=None, help="I/N: only the I-th of N shards")
    args = parser.parse_args(argv)
    if args.command == "explain":
        return explain(args)
    if args.command == "merge-reports":
        from .merge import merge_reports

        paths = merge_reports(args.dirs, args.out)
        print(f"merged {len(args.dirs)} report folders -> {paths['html']}")
        return 0

    from .pipeline import default_device

    set_threads()
    options = Options(cases=tuple(args.paths), report_dir=args.report_dir, device=args.device or default_device(),
                      dtype=args.dtype, model=args.model, cache_dir=args.cache_dir,
                      thresholds={"ssim_min": args.ssim_min}, shard=_shard(args.shard),
                      report_images=args.report_images)
    tasks = plan(options)
    records = run(options, tasks)
    for r in records:
        ssim = f"{r['ssim']:.4f}" if r.get("ssim") is not None else "-"
        print(f"{r['verdict']:<24} ssim {ssim:<7} {r['id']}  {r['reason']}")
    counts: dict[str, int] = {}
    for r in records:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(", ".join(f"{n} {v}" for v, n in sorted(counts.items())), f"-> {args.report_dir / 'index.html'}")
    return 0 if all(r["verdict"] in ("match", "skipped") for r in records) else 1


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    i, n = (int(x) for x in text.split("/"))
    return i, n


def explain(args) -> int:
    import json

    from .pipeline import default_device

    set_threads()
    options = Options(cases=tuple(args.paths), report_dir=args.report_dir, device=args.device or default_device(),
                      dtype=args.dtype, model=args.model, cache_dir=args.cache_dir, explain="all",
                      metric=args.metric, floor=args.floor, reverse=args.reverse,
                      noise_floor=not args.no_measured_floor, report_images=args.report_images)
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
        print(f"  {data['metric']}: reference {data['reference_distance']:.4f}, training "
              f"{data['training_distance']:.4f}, gap {data['gap']:.4f}, noise floor {data['floor']:.4f}")
        if data["gap"] is not None and data["gap"] <= data["floor"]:
            print("  the gap is within the noise floor: no recipe difference can be blamed for it")
        for c in data["causes"]:
            name = "+".join(c["fields"])
            if not c["testable"]:
                print(f"    {name:<40} not testable: {c['reason']}")
            elif c["share"] is None:
                print(f"    {name:<40} distance {c['distance']:.4f} (no gap to explain)")
            else:
                rev = "" if c["reverse_distance"] is None else \
                    f", training recipe with the reference value: {c['reverse_distance']:.4f}"
                print(f"    {name:<40} closes {c['share']:7.1%} (distance {c['distance']:.4f}{rev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
