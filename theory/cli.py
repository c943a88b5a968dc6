"""Command line of :mod:`theory`: ``python -m theory verify`` and ``python -m theory basin``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import run_verify, summary_table, write_report

    try:
        report = run_verify(args.only, seed=args.seed, instances=args.instances, progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out is not None:
        write_report(report, args.out)
    if args.json:
        print(json.dumps(report.records(), indent=2))
    else:
        print(summary_table(report))
        print(f"\n{'PASS' if report.passed else 'FAIL'}: {len(report.results)} checks, seed {args.seed}, "
              f"{report.seconds:.1f} s" + (f", report in {args.out}" if args.out else ""))
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m theory",
        description="Check the theory of complexity-aware structure discovery (docs/theory.md): Theorem 3.1, "
        "Lemmas 1-2, Theorems 5.1/5.2, integrators; map domains of attraction.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="run the numerical checks and write a report")
    v.add_argument("--only", default=None, help="a check name or group (e.g. determinism, dynamics), comma-separated")
    v.add_argument("--instances", type=int, default=None, help="random instances per check (default: each check's)")
    v.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    v.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    v.add_argument("--out", default=None, help="report directory (results.json, summary.md, checks.png)")
    v.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    v.set_defaults(func=cmd_verify)
    from .basin import add_basin_parser

    add_basin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))
