"""Your budget, measured: the default configuration trained to FLOPs-reduction targets, one table.

For each target ``T`` (default 30 / 50 / 70 %) one run of the real trainer in a subprocess::

    python -m pruning train --config experiments/configs/default.toml --set objective.target_fpr=T \\
        --out <out>/fpr<T> --overwrite

(γ adapted during training by :mod:`pruning.budget`, the same controller for every target), then a
table of target, final fPR, pPR, test accuracy, final and largest γ and whether the final fPR lies
within ``--tolerance`` points (default 3) of the target, written (atomically) to ``--table``
(default ``<out>/BUDGET.md``) with the exact commands, the machine and the wall time of each run.

    python experiments/budget_targets.py                          # three runs (~1-3 min each on 2 CPU cores)
    python experiments/budget_targets.py --targets 0.5 --seed 1   # one target, another random seed
    python experiments/budget_targets.py --report-only            # tabulate finished runs, train nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theory.atomic import atomic_write_text  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "default.toml"
DEFAULT_OUT = ROOT / "runs" / "budget"


def run_dir(out: Path, target: float, seed: int) -> Path:
    return out / f"fpr{round(100 * target):02d}" / f"seed{seed}"


def command(config: Path, target: float, seed: int, out: Path, extra: list[str]) -> list[str]:
    """The training command of one target (``--overwrite``: a rerun starts the run over)."""
    sets = [f"objective.target_fpr={target:g}", f"train.seed={seed}", *extra]
    return [sys.executable, "-m", "pruning", "train", "--config", str(config),
            *[a for s in sets for a in ("--set", s)], "--out", str(run_dir(out, target, seed)), "--overwrite"]


def shown(cmd: list[str]) -> str:
    """The command as a user would type it (``python`` for the interpreter, paths relative to the checkout)."""
    parts = ["python" if c == sys.executable else os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
             for c in cmd]
    return shlex.join(parts)


def table(rows: list[dict[str, Any]], tolerance: float) -> list[str]:
    lines = [
        f"| target fPR | final fPR | pPR | test accuracy | final γ | largest γ | within ±{tolerance:g} points | "
        "wall time |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        rep, b = r["report"], r["report"]["budget"]
        ok = abs(b["error"]) <= tolerance / 100
        lines.append(
            f"| {100 * b['target']:.0f} % | {100 * rep['fPR']:.2f} % | {100 * rep['pPR']:.2f} % | "
            f"{100 * rep['test_accuracy']:.2f} % | {b['final_gamma']:.4f} | {b['max_gamma']:.4f} | "
            f"{'met' if ok else 'missed'} ({100 * b['error']:+.2f}) | {r['wall_s']:.0f} s |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--targets", default="0.3,0.5,0.7", help="comma-separated fractions (0.5 = 50 %%)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table", type=Path, default=None, help="the Markdown table (default <out>/BUDGET.md)")
    ap.add_argument("--tolerance", type=float, default=3.0, help="points of fPR (default 3)")
    ap.add_argument("--set", action="append", default=[], dest="extra", help="more overrides for every run")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs, train nothing")
    args = ap.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    rows = []
    for t in targets:
        cmd = command(args.config, t, args.seed, args.out, args.extra)
        d = run_dir(args.out, t, args.seed)
        meta = d / "budget_run.json"
        if not args.report_only:
            print(f"$ {shown(cmd)}", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            atomic_write_text(meta, json.dumps({"wall_s": time.perf_counter() - t0, "command": shown(cmd)}))
        if not (d / "report.json").exists():
            print(f"{d}: no report.json (run it first)", file=sys.stderr)
            return 1
        info = json.loads(meta.read_text()) if meta.exists() else {"wall_s": float("nan"), "command": shown(cmd)}
        rows.append({"report": json.loads((d / "report.json").read_text()), **info})
        b = rows[-1]["report"]["budget"]
        print(f"target {100 * t:.0f} %: fPR {100 * rows[-1]['report']['fPR']:.2f} %, final γ {b['final_gamma']:.4f}",
              flush=True)
    lines = [
        f"# Budget targets on `{os.path.relpath(args.config, ROOT)}` (seed {args.seed})",
        "",
        "γ adapted during training to each FLOPs-reduction target by `pruning.budget` (one controller,",
        "the same gains for every target); fPR, pPR of the deterministic final network.",
        "",
        *table(rows, args.tolerance),
        "",
        "Commands:",
        "",
        "```bash",
        *[r["command"] for r in rows],
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        "wall times are indicative (shared machine).",
        "",
    ]
    path = args.table or args.out / "BUDGET.md"
    atomic_write_text(path, "\n".join(lines))
    print("\n".join(table(rows, args.tolerance)))
    print(f"wrote {path}")
    return 0 if all(abs(r["report"]["budget"]["error"]) <= args.tolerance / 100 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
