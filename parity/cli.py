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
    p_run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p_run.add_argument("--dtype", default="bfloat16")
    p_run.add_argument("--model", default=None, help="hub id or diffusers folder for every case")
    p_run.add_argument("--cache-dir", type=Path, default=Path(".parity-cache"))
    p_run.add_argument("--ssim-min", type=float, default=DEFAULT_THRESHOLDS["ssim_min"])
    args = parser.parse_args(argv)

    from .pipeline import default_device

    set_threads()
    options = Options(cases=tuple(args.paths), report_dir=args.report_dir, device=args.device or default_device(),
                      dtype=args.dtype, model=args.model, cache_dir=args.cache_dir,
                      thresholds={"ssim_min": args.ssim_min})
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


if __name__ == "__main__":
    sys.exit(main())
