"""Run the benchmark suites and print one table: ``python -m bench [SUITE ...]``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

from bench._table import Row, render

SUITES = [
    "policy",
    "audit",
    "login",
    "spawn",
    "proxy",
    "cli",
    "data",
    "model",
    "packages",
    "pools",
    "monitor",
    "runs",
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run: {', '.join(SUITES)} (all)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (smoke test)")
    args = parser.parse_args()
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; expected some of {', '.join(SUITES)}")
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.suites or SUITES:
        module = importlib.import_module(f"bench.{name}")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += module.run(quick=args.quick)
    print(
        f"\nzerotrust-lab benchmarks ({platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}, "
        f"{time.perf_counter() - started:.0f} s)\n"
    )
    print(render(rows))


if __name__ == "__main__":
    main()
