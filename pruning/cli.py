"""Command line of the training toolkit: ``python -m pruning {train,evaluate,export,flops} ...``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from theory.architectures import ARCHITECTURES, by_name
from theory.complexity import ComplexityModel


def _fmt(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def cmd_flops(args: argparse.Namespace) -> int:
    """Baseline FLOPs (conv + linear MACs) and parameters through the one complexity model (THEORY §3)."""
    spec = by_name(args.model)
    model = ComplexityModel(spec, elementwise=False)
    flops, params = float(model.flops()), float(model.params())
    record = {
        "model": args.model,
        "flops": flops,
        "params": params,
        "layers": spec.depth,
        "prunable_blocks": spec.prunable_blocks,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
    }
    if args.per_layer:
        record["per_layer"] = {k: {"flops": f, "params": p} for k, (f, p) in model.per_layer().items()}
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{args.model}: {_fmt(flops)} FLOPs (MACs), {_fmt(params)} parameters, {spec.depth} layers, "
          f"{spec.prunable_blocks} prunable blocks, input {tuple(spec.input_shape)}")
    if args.per_layer:
        print(f"{'layer':<28}{'FLOPs':>14}{'params':>12}")
        for name, (f, p) in model.per_layer().items():
            print(f"{name:<28}{_fmt(f):>14}{_fmt(p):>12}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruning",
        description="Complexity-aware training that prunes units and layers while it trains (arXiv 2411.09127).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("flops", help="baseline FLOPs (conv+linear MACs) and parameters of an architecture")
    p.add_argument("--model", required=True, choices=sorted(ARCHITECTURES), help="architecture name")
    p.add_argument("--per-layer", action="store_true", help="also list FLOPs and parameters per layer")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.set_defaults(func=cmd_flops)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
