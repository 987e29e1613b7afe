"""Cost of attribution on the bundled cases: renders done and wall time against the count of differing fields.

Goal: renders = 1 (reference) + one per differing (testable) field group + 1 (all training values), no more.
Run: python bench/attribution.py [--cases cases] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from parity.attribution import cause_groups, NOT_RENDERED
from parity.recipe import differing_fields
from parity.runner import Checker, Options, open_preview, plan, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=Path, default=Path("cases"))
    parser.add_argument("--limit", type=int, default=0, help="explain only the first N previews")
    args = parser.parse_args()
    set_threads()
    options = Options(cases=(args.cases,), cache_dir=None, explain="none", metrics=())
    checker = Checker(options)
    tasks = [t for t in plan(options) if t.reference is not None]
    tasks = tasks[: args.limit] if args.limit else tasks
    total_renders = total_expected = 0
    start_all = time.perf_counter()
    print(f"{'preview':<48} {'fields':>6} {'groups':>6} {'expected':>8} {'renders':>7} {'seconds':>8}")
    for task in tasks:
        before = checker.renders.made
        checker.renders._recent.clear()  # count each preview's renders from scratch
        start = time.perf_counter()
        checker.explain(task, open_preview(task.preview), {})
        fields = differing_fields(task.training, task.reference)
        groups = [g for g in cause_groups(fields) if not any(f in NOT_RENDERED for f in g)]
        # reference + each testable group + all-training; a group whose switch *is* the training recipe is free
        expected = 2 + len(groups)
        done = checker.renders.made - before
        total_renders += done
        total_expected += expected
        print(f"{task.id:<48} {len(fields):>6} {len(groups):>6} {expected:>8} {done:>7} "
              f"{time.perf_counter() - start:>8.1f}")
    print(f"total: {total_renders} renders (budget 1 + groups + 1 = {total_expected}) for {len(tasks)} previews in "
          f"{time.perf_counter() - start_all:.1f} s; ratio renders/budget = {total_renders / max(total_expected, 1):.2f}")


if __name__ == "__main__":
    main()
