"""Baseline vs layer-only vs unit-only vs combined pruning over a grid of (γ, ρ, δ) and seeds.

Every run goes through the real trainer, one subprocess each::

    python -m pruning train --config <dataset config> --out <run dir> --set model.mode=... --set objective.gamma=...

and lives in its own directory ``<out>/<dataset>/e<epochs>/<setting tag>/seed<k>`` (``report.json``,
``log.csv``, ``checkpoint.pt``, ``train.log`` and this script's ``compare_run.json`` with the measured
wall time).  A run whose ``report.json`` exists is skipped, an interrupted one (checkpoint, no
report) is resumed, so the grid can be stopped and restarted at will; a cached run whose
configuration differs from the one asked for is an error (use another ``--out``).

The finished runs are aggregated per setting (mean ± sd over seeds) into a table in the style of the
paper's Tables 2–5 (Test Acc, Baseline Acc, Layers Left, fPR, pPR, plus the training cost Σ E[F]
relative to the baseline network), the accuracy-vs-fPR Pareto front of each mode is computed from
the per-setting means, and ``experiments/RESULTS.md`` is written (atomically) with the command that
reproduces it, the machine, the compute used and a plain statement of whether the combined mode's
front dominates the single-mode fronts.  The figures of ``paper_figures/`` (fig2, fig3, fig4,
pareto) are drawn from the same run directories.

    python experiments/compare.py --grid quick --datasets mnist1d,digits --seeds 3 --epochs 15 --jobs 2
    python experiments/compare.py ... --report-only      # aggregate what is there, train nothing
    python experiments/compare.py --runs runs/sweep1     # the runs of a sweep (python -m pruning sweep):
                                                         # runs/sweep1/compare.md and runs/sweep1/figures
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theory.atomic import atomic_path, atomic_write_text  # noqa: E402

CONFIGS = {
    "mnist1d": ROOT / "experiments" / "configs" / "default.toml",
    "digits": ROOT / "experiments" / "configs" / "digits.toml",
}
DATASET_TITLES = {"mnist1d": "MNIST-1D, ResNet-1D-20", "digits": "digits 8×8, ResNet-20 (width 16)"}
MODES = ("none", "layer", "unit", "combined")
MODE_TITLES = {"none": "baseline", "layer": "layer-only", "unit": "unit-only", "combined": "combined"}
SINGLE_MODES = ("layer", "unit")
RUN_META = "compare_run.json"
SESSIONS = "compare_sessions.json"
DEFAULT_OUT = ROOT / "runs" / "compare"
DEFAULT_RESULTS = ROOT / "experiments" / "RESULTS.md"
DEFAULT_FIGURES = ROOT / "reports" / "figures" / "compare"
#: train keys that do not change what a run computes (ignored when a cached run is checked)
FREE_TRAIN_KEYS = {"progress", "tensorboard", "log_every", "out_dir", "device", "threads"}


# --------------------------------------------------------------------------------------------------
# Settings, grids, run directories
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter configuration of one dataset (a row of the table); ``None`` = not used by the mode."""

    dataset: str
    mode: str
    gamma: float | None = None
    rho: float | None = None
    delta: float | None = None
    #: further grid values of a sweep (``python -m pruning sweep``): ``(field, value text)`` pairs
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def tag(self) -> str:
        more = [f"{k}{v}" for k, v in self.extra]
        if self.mode == "none":
            return "_".join(["none", *more])
        parts = [self.mode, f"g{self.gamma:g}", f"r{self.rho:g}"]
        if self.delta is not None:
            parts.append(f"d{self.delta:g}")
        return "_".join(parts + more)

    def overrides(self) -> list[str]:
        """``--set`` strings; parameters a mode does not use are pinned so that the run dir says everything."""
        out = [f"model.mode={self.mode}"]
        if self.mode != "none":
            out += [f"objective.gamma={self.gamma!r}", f"objective.rho={self.rho!r}",
                    f"objective.delta={0.0 if self.delta is None else self.delta!r}"]
        return out

    def label(self) -> str:
        """Short legend text, e.g. ``combined γ=0.1 ρ=0.2 δ=0.5``."""
        more = "".join(f" {k}={v}" for k, v in self.extra)
        if self.mode == "none":
            return "baseline" + more
        s = f"{MODE_TITLES[self.mode]} γ={self.gamma:g} ρ={self.rho:g}"
        return s + (f" δ={self.delta:g}" if self.delta is not None else "") + more


@dataclass(frozen=True)
class GridSpec:
    """``gammas`` for every pruning mode; ``rhos``/``deltas`` for combined; single modes use ``single_rho``."""

    gammas: tuple[float, ...]
    rhos: tuple[float, ...]
    deltas: tuple[float, ...]
    layer_gammas: tuple[float, ...] | None = None  # default: gammas
    unit_gammas: tuple[float, ...] | None = None
    single_rhos: tuple[float, ...] = (0.5,)
    layer_delta: float = 0.5


#: grids per name and dataset.  quick: this session's budget (about an hour on 2 busy cores at 15 epochs);
#: full: the grid the toolkit is meant to be judged on (a few CPU hours at the configs' 30 epochs).
GRIDS: dict[str, dict[str, GridSpec]] = {
    "quick": {
        "mnist1d": GridSpec(gammas=(0.03, 0.1), rhos=(0.2, 0.8), deltas=(0.0, 0.5)),
        "digits": GridSpec(gammas=(0.03, 0.1), rhos=(0.2, 0.8), deltas=(0.5,), layer_gammas=(0.1,),
                           unit_gammas=(0.1,)),
    },
    "full": {
        ds: GridSpec(gammas=(0.02, 0.05, 0.1, 0.2), rhos=(0.2, 0.8), deltas=(0.0, 0.5), single_rhos=(0.2, 0.8))
        for ds in CONFIGS
    },
    "smoke": {
        ds: GridSpec(gammas=(0.1,), rhos=(0.5,), deltas=(0.5,)) for ds in CONFIGS
    },
}


def grid_settings(grid: str, dataset: str) -> list[Setting]:
    """The settings of ``grid`` on ``dataset``: baseline, layer-only, unit-only, combined (in that order)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r} (choose one of {', '.join(GRIDS)})")
    if dataset not in CONFIGS:
        raise ValueError(f"unknown dataset {dataset!r} (choose one of {', '.join(CONFIGS)})")
    g = GRIDS[grid][dataset]
    out = [Setting(dataset, "none")]
    for gamma in g.layer_gammas or g.gammas:
        for rho in g.single_rhos:
            out.append(Setting(dataset, "layer", gamma, rho, g.layer_delta))
    for gamma in g.unit_gammas or g.gammas:
        for rho in g.single_rhos:
            out.append(Setting(dataset, "unit", gamma, rho, None))  # no block gates: δ has no effect
    for gamma in g.gammas:
        for rho in g.rhos:
            for delta in g.deltas:
                out.append(Setting(dataset, "combined", gamma, rho, delta))
    return out


@dataclass(frozen=True)
class RunSpec:
    setting: Setting
    seed: int
    epochs: int | None  # None: the config's own
    extra: tuple[str, ...] = ()  # further --set overrides for every run (e.g. data.train_subset=256)

    def overrides(self) -> list[str]:
        # export off: torch.export costs ~20 s per run here and the figures read the checkpoint instead
        # and no TensorBoard events (display only, like the progress bar)
        out = self.setting.overrides() + [f"train.seed={self.seed}", "train.progress=false", "train.threads=1",
                                          "train.tensorboard=false", "export.enabled=false"]
        if self.epochs is not None:
            out.append(f"train.epochs={self.epochs}")
        return out + list(self.extra)

    def run_dir(self, root: Path) -> Path:
        ep = f"e{self.epochs}" if self.epochs is not None else "e-config"
        return root / self.setting.dataset / ep / self.setting.tag / f"seed{self.seed}"


def plan(
    grid: str, datasets: Sequence[str], seeds: int, epochs: int | None, extra: Sequence[str] = ()
) -> list[RunSpec]:
    """All runs, seed-major (every setting's seed 0 first), so a grid stopped early covers every setting."""
    runs = []
    for seed in range(seeds):
        for ds in datasets:
            for s in grid_settings(grid, ds):
                runs.append(RunSpec(s, seed, epochs, tuple(extra)))
    return runs


# --------------------------------------------------------------------------------------------------
# Running (subprocesses of the real CLI), caching, resuming
# --------------------------------------------------------------------------------------------------


def expected_config(run: RunSpec) -> dict[str, Any]:
    from pruning.config import load_config

    return load_config(CONFIGS[run.setting.dataset], run.overrides()).to_dict()


def config_diffs(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ; keys missing on one side (another trainer version) are not counted."""
    diffs = []
    for section, table in want.items():
        other = have.get(section)
        if not isinstance(table, dict) or not isinstance(other, dict):
            if other is not None and table != other:
                diffs.append(section)
            continue
        for k, v in table.items():
            if section == "train" and k in FREE_TRAIN_KEYS or k not in other:
                continue
            if json.dumps(v, sort_keys=True) != json.dumps(other[k], sort_keys=True):
                diffs.append(f"{section}.{k}")
    return sorted(diffs)


def run_state(run: RunSpec, root: Path) -> str:
    """``done`` (report.json present), ``partial`` (checkpoint only), ``failed`` (last attempt failed) or ``todo``."""
    d = run.run_dir(root)
    if (d / "report.json").is_file():
        return "done"
    meta = _read_json(d / RUN_META)
    if meta and meta.get("status") == "failed" and not (d / "checkpoint.pt").is_file():
        return "failed"
    if (d / "checkpoint.pt").is_file():
        return "partial"
    return "todo"


def check_cached(run: RunSpec, root: Path) -> None:
    """A cached report must come from the configuration this run asks for (else: ValueError)."""
    report = _read_json(run.run_dir(root) / "report.json")
    if report is None:
        return
    diffs = config_diffs(expected_config(run), report.get("config", {}))
    if diffs:
        raise ValueError(f"{run.run_dir(root)} holds a run with another configuration ({', '.join(diffs)}); "
                         "use another --out")


def command_for(run: RunSpec, root: Path, *, resume: bool) -> list[str]:
    """The training command; a failed attempt without a checkpoint is started over (``--overwrite``)."""
    cmd = [sys.executable, "-m", "pruning", "train", "--config", str(CONFIGS[run.setting.dataset]),
           "--out", str(run.run_dir(root))]
    for o in run.overrides():
        cmd += ["--set", o]
    if resume:
        return cmd + ["--resume"]
    return cmd + (["--overwrite"] if (run.run_dir(root) / "provenance.json").is_file() else [])


def execute(run: RunSpec, root: Path) -> dict[str, Any]:
    """Train (or resume) one run in a subprocess; record status and wall time in ``compare_run.json``."""
    d = run.run_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    resume = (d / "checkpoint.pt").is_file()
    cmd = command_for(run, root, resume=resume)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    code = code_version()
    start, t0 = time.time(), time.perf_counter()
    # the trainer writes train.log and provenance.json itself; what it printed before (or without) them is kept here
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          check=False)
    rc = proc.returncode
    wall = time.perf_counter() - t0
    prev = _read_json(d / RUN_META) or {}
    attempts = list(prev.get("attempts", [])) + [{"start": start, "wall_s": wall, "returncode": rc, "resumed": resume,
                                                  "output_tail": (proc.stdout or "")[-2000:]}]
    meta = {
        "status": "done" if rc == 0 and (d / "report.json").is_file() else "failed",
        "returncode": rc,
        "wall_s": sum(a["wall_s"] for a in attempts),
        "attempts": attempts,
        "command": shlex.join(cmd),
        "setting": setting_dict(run.setting),
        "seed": run.seed,
        "host": platform.node(),
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "code": code,
    }
    atomic_write_text(d / RUN_META, json.dumps(meta, indent=2) + "\n")
    return meta


def code_version() -> dict[str, str]:
    """The git commit (read-only ``git rev-parse``) and a hash of the code a run executes (pruning/, theory/).

    The hash covers uncommitted edits too, so runs of one grid can be checked to share one code version.
    """
    import hashlib

    h = hashlib.sha256()
    for d in ("pruning", "theory"):
        for f in sorted((ROOT / d).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"commit": commit or "?", "source_sha256": h.hexdigest()[:12]}


def run_grid(runs: Sequence[RunSpec], root: Path, *, jobs: int, retry_failed: bool = False,
             log: Any = print) -> dict[str, int]:
    """Train every run that is not finished (``jobs`` subprocesses at a time); returns counts by outcome."""
    for r in runs:
        check_cached(r, root)
    states = {r: run_state(r, root) for r in runs}
    todo = [r for r in runs if states[r] in ("todo", "partial") or (retry_failed and states[r] == "failed")]
    counts = {"cached": sum(1 for s in states.values() if s == "done"), "done": 0, "failed": 0,
              "skipped_failed": sum(1 for r in runs if states[r] == "failed" and r not in todo)}
    log(f"{len(runs)} runs in the grid: {counts['cached']} finished already, {len(todo)} to train "
        f"({jobs} at a time)")
    lock = threading.Lock()
    done = [0]

    def one(run: RunSpec) -> None:
        meta = execute(run, root)
        rep = _read_json(run.run_dir(root) / "report.json")
        with lock:
            done[0] += 1
            counts[meta["status"]] += 1
            what = (f"acc {100 * rep['test_accuracy']:.2f}%  fPR {100 * rep['fPR']:.1f}%  pPR {100 * rep['pPR']:.1f}%"
                    f"  layers {rep['layers_left']}" if rep
                    else f"FAILED (rc {meta['returncode']}, see train.log and {RUN_META})")
            log(f"[{done[0]}/{len(todo)}] {run.setting.dataset} {run.setting.tag} seed{run.seed}: {what}  "
                f"{meta['wall_s']:.0f}s")

    if jobs <= 1:
        for r in todo:
            one(r)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(one, r) for r in todo]:
                f.result()
    return counts


# --------------------------------------------------------------------------------------------------
# Records and aggregation
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def setting_dict(s: Setting) -> dict[str, Any]:
    out = {"dataset": s.dataset, "mode": s.mode, "gamma": s.gamma, "rho": s.rho, "delta": s.delta}
    return {**out, "extra": dict(s.extra)} if s.extra else out


def setting_from_config(cfg: dict[str, Any], extra: tuple[tuple[str, str], ...] = ()) -> Setting:
    """The :class:`Setting` a run's configuration (report.json ``config``) belongs to."""
    mode, o = cfg["model"]["mode"], cfg["objective"]
    if mode == "none":
        return Setting(cfg["data"]["name"], "none", extra=extra)
    return Setting(cfg["data"]["name"], mode, float(o["gamma"]), float(o["rho"]),
                   None if mode == "unit" else float(o["delta"]), extra)


#: what :class:`Setting` holds already (other grid fields of a sweep become its ``extra``)
_SETTING_FIELDS = {"data.name", "model.mode", "objective.gamma", "objective.rho", "objective.delta"}


def sweep_extra(d: Path) -> tuple[tuple[str, str], ...]:
    """The grid values of a sweep's run folder ``<out>/<setting>/seed<k>`` other than the Setting's own
    (from ``<out>/<setting>/sweep_point.json``, written by ``python -m pruning sweep``)."""
    point = _read_json(d.parent / "sweep_point.json")
    params = point.get("params") if isinstance(point, dict) else None
    if not isinstance(params, dict):
        return ()
    return tuple((k, json.dumps(v) if not isinstance(v, str) else v)
                 for k, v in params.items() if k not in _SETTING_FIELDS)


def record_from_dir(d: Path) -> dict[str, Any] | None:
    """One flat record of a finished run directory (``None`` when it has no report.json)."""
    rep = _read_json(d / "report.json")
    if rep is None:
        return None
    meta = _read_json(d / RUN_META) or {}
    s = setting_from_config(rep["config"], sweep_extra(d))
    return {
        **setting_dict(s),
        "setting": s,
        "seed": int(rep["config"]["train"]["seed"]),
        "arch": rep["config"].get("model", {}).get("arch", "?"),
        "epochs": int(rep["epochs_completed"]),
        "acc": float(rep["test_accuracy"]),
        "fPR": float(rep["fPR"]),
        "pPR": float(rep["pPR"]),
        "layers": int(rep["layers_left"]),
        "baseline_layers": int(rep["baseline_layers"]),
        "blocks": int(rep["blocks_alive"]),
        "baseline_blocks": int(rep["baseline_blocks"]),
        "cost": float(rep["training_cost_ratio"]) if rep.get("training_cost_ratio") is not None else math.nan,
        "train_s": float(rep.get("wall_clock_s") or math.nan),
        "wall_s": float(meta.get("wall_s", rep.get("wall_clock_s") or math.nan)),
        "load5": float((meta.get("loadavg_end") or [math.nan] * 3)[1]),
        "code": meta.get("code") or {},
        "units_left": rep.get("units_left", []),
        "unsettled": _last_log_value(d, "theta_frac_lt_half"),
        "dir": str(d),
    }


def _last_log_value(d: Path, key: str) -> float:
    """``key`` of the last row of a run's log.csv (NaN when absent or empty)."""
    import csv

    try:
        with open(d / "log.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return float(rows[-1][key]) if rows and rows[-1].get(key) not in (None, "") else math.nan
    except (FileNotFoundError, ValueError, KeyError):
        return math.nan


def load_records(root: Path | str, runs: Iterable[RunSpec] | None = None) -> list[dict[str, Any]]:
    """Records of the finished runs: those of ``runs`` (a plan) or every ``report.json`` under ``root``."""
    root = Path(root)
    dirs = [r.run_dir(root) for r in runs] if runs is not None else sorted(p.parent for p in root.rglob("report.json"))
    return [rec for d in dirs if (rec := record_from_dir(d)) is not None]


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


METRICS = ("acc", "fPR", "pPR", "layers", "blocks", "cost", "wall_s", "train_s", "unsettled")


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd (ddof 1) over seeds per setting; ``baseline_acc`` = the dataset's baseline mean.

    Rows come out per dataset, in mode order none, layer, unit, combined, then by (γ, ρ, δ).
    """
    groups: dict[Setting, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["setting"], []).append(r)
    rows = []
    for s, rs in groups.items():
        row: dict[str, Any] = {**setting_dict(s), "setting": s, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                               "baseline_layers": rs[0]["baseline_layers"], "baseline_blocks": rs[0]["baseline_blocks"],
                               "epochs": sorted({r["epochs"] for r in rs})}
        for k in METRICS:
            row[k], row[f"{k}_sd"] = _mean_sd([float(r.get(k, math.nan)) for r in rs])
        rows.append(row)
    base = {r["dataset"]: (r["acc"], r["acc_sd"]) for r in rows if r["mode"] == "none"}
    base_wall = {r["dataset"]: r["train_s"] for r in rows if r["mode"] == "none"}
    for r in rows:
        r["baseline_acc"], r["baseline_acc_sd"] = base.get(r["dataset"], (math.nan, math.nan))
        bw = base_wall.get(r["dataset"], math.nan)
        r["time_ratio"] = r["train_s"] / bw if bw and not math.isnan(bw) else math.nan

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        ds = list(CONFIGS).index(r["dataset"]) if r["dataset"] in CONFIGS else 99
        return (ds, r["dataset"], MODES.index(r["mode"]), r["gamma"] or 0.0, r["rho"] or 0.0, r["delta"] or 0.0,
                r["setting"].extra)

    return sorted(rows, key=key)


# --------------------------------------------------------------------------------------------------
# Pareto fronts (maximise accuracy and fPR) and front dominance
# --------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates maximised), sorted by the first coordinate.

    ``q`` dominates ``p`` when ``q ≥ p`` in both coordinates and ``q > p`` in one; of identical points
    only the first is kept.  NaN points are ignored.
    """
    idx = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    keep = []
    for i in idx:
        p = points[i]
        dominated = False
        for j in idx:
            q = points[j]
            if j == i:
                continue
            if q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]):
                dominated = True
                break
            if q == p and j < i:
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def covers(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points of ``b`` NOT weakly dominated by any point of ``a`` (empty: ``a`` covers ``b``)."""
    return [i for i, p in enumerate(b) if not any(q[0] >= p[0] and q[1] >= p[1] for q in a)]


def front_relation(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> str:
    """How front ``a`` compares with front ``b``: ``dominates``, ``dominated``, ``equal`` or ``incomparable``.

    ``a`` dominates ``b`` when every point of ``b`` is weakly dominated by a point of ``a`` and not
    vice versa (set dominance of Pareto fronts).  An empty front is dominated by any non-empty one.
    """
    if not a and not b:
        return "equal"
    a_covers_b, b_covers_a = not covers(a, b), not covers(b, a)
    if a_covers_b and b_covers_a:
        return "equal"
    if a_covers_b:
        return "dominates"
    if b_covers_a:
        return "dominated"
    return "incomparable"


def hypervolume(front: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area of the region dominated by ``front`` and dominating ``ref`` (both coordinates maximised)."""
    pts = sorted((p for p in front if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0])
    area, best_y = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        best_y = max(best_y, y)
        area += (x - nxt) * (best_y - ref[1])
    return area


def mode_fronts(rows: Sequence[dict[str, Any]], dataset: str) -> dict[str, list[dict[str, Any]]]:
    """Per pruning mode, the rows on its accuracy-vs-fPR Pareto front (from the per-setting means)."""
    out = {}
    for mode in ("layer", "unit", "combined"):
        rs = [r for r in rows if r["dataset"] == dataset and r["mode"] == mode]
        idx = pareto_front([(r["fPR"], r["acc"]) for r in rs])
        out[mode] = [rs[i] for i in idx]
    return out


def dominance(rows: Sequence[dict[str, Any]], dataset: str) -> dict[str, Any]:
    """Combined front vs each single-mode front on one dataset: relation, uncovered points, hypervolumes."""
    fronts = mode_fronts(rows, dataset)
    pts = {m: [(r["fPR"], r["acc"]) for r in f] for m, f in fronts.items()}
    chance = 0.1
    res: dict[str, Any] = {"fronts": fronts, "hypervolume": {m: hypervolume(p, (0.0, chance)) for m, p in pts.items()},
                           "relations": {}, "uncovered": {}}
    for m in SINGLE_MODES:
        if not pts[m] or not pts["combined"]:
            res["relations"][m] = "missing"
            res["uncovered"][m] = []
            continue
        res["relations"][m] = front_relation(pts["combined"], pts[m])
        res["uncovered"][m] = [fronts[m][i] for i in covers(pts["combined"], pts[m])]
    rel = [res["relations"][m] for m in SINGLE_MODES]
    res["dominates_all"] = all(r == "dominates" for r in rel)
    res["covers_all"] = all(r in ("dominates", "equal") for r in rel)
    return res


# --------------------------------------------------------------------------------------------------
# RESULTS.md
# --------------------------------------------------------------------------------------------------


def _pm(m: float, sd: float, scale: float = 100.0, digits: int = 2) -> str:
    if math.isnan(m):
        return "–"
    if math.isnan(sd):
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def _p(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def results_table(rows: Sequence[dict[str, Any]], dataset: str) -> list[str]:
    lines = [
        "| Mode | γ | ρ | δ | Test Acc (%) | Baseline Acc (%) | Layers Left | fPR (%) | pPR (%) "
        "| Train cost Σ E[F] | Gates θ<½ left (%) | Train time (s) | Seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["dataset"] != dataset:
            continue
        layers = f"{r['layers']:.1f} ± {r['layers_sd']:.1f}" if not math.isnan(r["layers_sd"]) else f"{r['layers']:.1f}"
        more = "".join(f" {k}={v}" for k, v in r["setting"].extra)
        lines.append(
            f"| {MODE_TITLES[r['mode']]}{more} | {_p(r['gamma'])} | {_p(r['rho'])} | {_p(r['delta'])} "
            f"| {_pm(r['acc'], r['acc_sd'])} | {_pm(r['baseline_acc'], r['baseline_acc_sd'])} "
            f"| {layers} / {r['baseline_layers']} | {_pm(r['fPR'], r['fPR_sd'], digits=1)} "
            f"| {_pm(r['pPR'], r['pPR_sd'], digits=1)} | {_pm(r['cost'], r['cost_sd'], 1.0, 3)} "
            f"| {_pm(r['unsettled'], math.nan, digits=0)} | {r['train_s']:.0f} | {r['n']} |"
        )
    return lines


def _point(r: dict[str, Any]) -> str:
    return f"{r['setting'].label()} (acc {100 * r['acc']:.2f} %, fPR {100 * r['fPR']:.1f} %)"


def dominance_text(rows: Sequence[dict[str, Any]], dataset: str) -> list[str]:
    d = dominance(rows, dataset)
    hv = d["hypervolume"]
    lines = []
    for m in ("layer", "unit", "combined"):
        pts = ", ".join(f"({100 * r['fPR']:.1f} %, {100 * r['acc']:.2f} %)" for r in d["fronts"][m]) or "none"
        lines.append(f"- {MODE_TITLES[m]} front (fPR, acc): {pts}; hypervolume above (0, chance 10 %): "
                     f"{hv[m]:.4f}")
    for m in SINGLE_MODES:
        rel = d["relations"][m]
        if rel == "missing":
            lines.append(f"- combined vs {MODE_TITLES[m]}: cannot compare (a front has no finished setting).")
            continue
        verdict = {"dominates": "DOMINATES", "equal": "equals", "dominated": "is DOMINATED BY",
                   "incomparable": "does NOT dominate (the fronts cross)"}[rel]
        line = f"- combined {verdict} the {MODE_TITLES[m]} front"
        unc = d["uncovered"][m]
        if unc:
            line += "; not covered by any combined setting: " + "; ".join(_point(r) + _shortfall(r, d) for r in unc)
        lines.append(line + ".")
    if d["dominates_all"]:
        summary = "**Yes**: the combined front dominates both single-mode fronts"
    elif d["covers_all"]:
        summary = "**Yes, weakly**: the combined front covers both single-mode fronts (some points equal)"
    else:
        bad = [MODE_TITLES[m] for m in SINGLE_MODES if d["relations"][m] not in ("dominates", "equal")]
        summary = (f"**No**: the combined front does not dominate the {' and '.join(bad)} "
                   f"front{'s' if len(bad) > 1 else ''}")
    n = {m: sum(1 for r in rows if r["dataset"] == dataset and r["mode"] == m) for m in ("layer", "unit", "combined")}
    lines.append(f"- settings per mode: layer-only {n['layer']}, unit-only {n['unit']}, combined {n['combined']}"
                 + ("; the mode with more settings has more chances to reach the front, which favours combined "
                    "here" if n["combined"] > max(n["layer"], n["unit"]) else "") + ".")
    unsettled = {m: _mean_sd([r["unsettled"] for r in rows if r["dataset"] == dataset and r["mode"] == m])[0]
                 for m in ("layer", "unit", "combined")}
    if not all(math.isnan(v) for v in unsettled.values()):
        lines.append("- gates still in flight at the end (share of surviving gates with θ < ½, mean over settings): "
                     + ", ".join(f"{MODE_TITLES[m]} {100 * v:.0f} %" for m, v in unsettled.items() if not math.isnan(v))
                     + ("; the fronts describe networks whose pruning had not finished."
                        if max(v for v in unsettled.values() if not math.isnan(v)) > 0.05 else "."))
    return [f"{summary} on {dataset} (per-setting means, {_seeds_phrase(rows, dataset)})."] + [""] + lines


def _shortfall(r: dict[str, Any], d: dict[str, Any]) -> str:
    """How far the combined front falls short of an uncovered point, against that point's seed sd."""
    comb = [c for c in d["fronts"]["combined"] if c["fPR"] >= r["fPR"]]
    sd = "" if math.isnan(r["acc_sd"]) else f", whose accuracy sd over seeds is {100 * r['acc_sd']:.2f}"
    if not comb:
        best = max(d["fronts"]["combined"], key=lambda c: c["fPR"])
        return (f" [no combined setting reaches fPR {100 * r['fPR']:.1f} %; the furthest reaches "
                f"{100 * best['fPR']:.1f} % at acc {100 * best['acc']:.2f} %]")
    best = max(comb, key=lambda c: c["acc"])
    return (f" [best combined setting with fPR ≥ {100 * r['fPR']:.1f} %: acc {100 * best['acc']:.2f} %, "
            f"{100 * (r['acc'] - best['acc']):.2f} points lower{sd}]")


def _seeds_phrase(rows: Sequence[dict[str, Any]], dataset: str) -> str:
    ns = sorted({r["n"] for r in rows if r["dataset"] == dataset})
    return "seeds per setting: " + "/".join(map(str, ns)) if ns else "no runs"


def machine_info() -> list[str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        tv = version("torch")  # without importing it (seconds on a busy machine)
    except Exception:  # pragma: no cover
        tv = "?"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return [
        f"- CPU: {cpu or '?'}, {os.cpu_count()} logical cores; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, torch {tv}; every run single-threaded (train.threads = 1)",
        f"- load average when this file was written: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min); "
        "the machine is shared, so wall times are inflated and noisy",
    ]


def _load_line(records: Sequence[dict[str, Any]], sessions: Sequence[dict[str, Any]]) -> list[str]:
    """The 5-minute load averages seen at the end of the runs (or of the script invocations)."""
    loads = [r["load5"] for r in records if not math.isnan(r.get("load5", math.nan))]
    what = "runs"
    if not loads:
        loads = [float(s[k][1]) for s in sessions for k in ("loadavg", "loadavg_end") if s.get(k)]
        what = "invocations of the script"
    if not loads:
        return []
    return [f"- 5-min load average at the end of the {what}: {min(loads):.1f} to {max(loads):.1f} "
            f"(median {sorted(loads)[len(loads) // 2]:.1f}) on 2 cores"]


def _code_line(records: Sequence[dict[str, Any]]) -> list[str]:
    versions: dict[tuple[str, str], int] = {}
    for r in records:
        c = r.get("code") or {}
        key = (c.get("commit", "?"), c.get("source_sha256", "?"))
        versions[key] = versions.get(key, 0) + 1
    known = {k: n for k, n in versions.items() if k != ("?", "?")}
    if not known:
        return ["- code version: not recorded for these runs (recorded by compare.py per run since it learnt to)"]
    parts = ", ".join(f"commit {c} / source {h}: {n} runs" for (c, h), n in sorted(known.items()))
    unknown = versions.get(("?", "?"), 0)
    return [f"- code version (git commit / sha256 of pruning/ + theory/ sources at run start): {parts}"
            + (f"; {unknown} runs without a record" if unknown else "")]


def canonical_command(args: argparse.Namespace) -> str:
    parts = ["python", "experiments/compare.py", "--grid", args.grid, "--datasets", ",".join(args.datasets),
             "--seeds", str(args.seeds)]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    parts += ["--jobs", str(args.jobs), "--out", _rel(Path(args.out))]
    for s in args.set or ():
        parts += ["--set", s]
    return shlex.join(parts)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def estimate_full(records: Sequence[dict[str, Any]], datasets: Sequence[str], seeds: int = 3) -> list[str]:
    """The full grid's size and its cost extrapolated from the measured seconds per epoch of this grid."""
    from pruning.config import load_config

    lines = []
    total = 0.0
    for ds in datasets:
        rs = [r for r in records if r["dataset"] == ds]
        n = len(grid_settings("full", ds))
        epochs = load_config(CONFIGS[ds]).train.epochs
        if not rs:
            lines.append(f"- {ds}: {n} settings × {seeds} seeds × {epochs} epochs (no measurement yet)")
            continue
        per_epoch = sum(r["train_s"] for r in rs) / sum(r["epochs"] for r in rs)
        overhead = sum(r["wall_s"] - r["train_s"] for r in rs) / len(rs)
        cost = n * seeds * (epochs * per_epoch + overhead)
        total += cost
        lines.append(f"- {ds}: {n} settings × {seeds} seeds × {epochs} epochs = {n * seeds} runs; measured "
                     f"{per_epoch:.2f} s of training per epoch (mean over this grid's modes) + {overhead:.0f} s "
                     f"per run (start-up, data, evaluation) -> about {cost / 3600:.1f} run-hours")
    g = GRIDS["full"][datasets[0]] if datasets else None
    if g is not None:
        lines.insert(0, f"- settings per dataset: baseline; layer-only and unit-only γ ∈ {list(g.gammas)} × "
                        f"ρ ∈ {list(g.single_rhos)} (layer δ = {g.layer_delta}); combined γ ∈ {list(g.gammas)} × "
                        f"ρ ∈ {list(g.rhos)} × δ ∈ {list(g.deltas)}")
    lines.append(f"- total about {total / 3600:.1f} run-hours, i.e. CPU hours since every run is single-threaded "
                 f"(≈ {total / 3600 / 2:.1f} h of wall clock with `--jobs 2` on 2 cores). These per-epoch times were "
                 "measured while the 2 cores were shared with other work (see the load averages above), so on an "
                 "idle machine the grid should take well under this: "
                 f"`python experiments/compare.py --grid full --datasets {','.join(datasets)} --seeds {seeds} "
                 "--jobs 2 --out runs/compare_full`")
    return lines


def write_results(args: argparse.Namespace, runs: Sequence[RunSpec], records: Sequence[dict[str, Any]],
                  figures: Sequence[Path], path: Path) -> str:
    rows = aggregate(records)
    root = Path(args.out)
    sessions = (_read_json(root / SESSIONS) or {}).get("sessions", [])
    wall_sum = sum(r["wall_s"] for r in records)
    now = time.time()
    elapsed = sum(s["elapsed_s"] if s.get("elapsed_s") is not None else now - s["start"] for s in sessions)
    finished = {Path(r["dir"]) for r in records}
    by_state: dict[str, int] = {"done": len(records)}
    for r in runs:
        if r.run_dir(root) in finished:
            continue
        st = run_state(r, root)
        st = "partial" if st == "done" else st  # finished after the records were read
        by_state[st] = by_state.get(st, 0) + 1
    L: list[str] = [
        "# Closing the loop: baseline vs layer-only vs unit-only vs combined pruning",
        "",
        "*Written by `experiments/compare.py`; do not edit by hand — rerun the command below.*",
        "",
        "Reproduce (trains what is missing, skips finished runs, then rewrites this file and the figures):",
        "",
        "```bash",
        canonical_command(args),
        "```",
        "",
        f"Grid `{args.grid}`, datasets {', '.join(args.datasets)}, {args.seeds} seeds (0..{args.seeds - 1}), "
        f"{'the configs’ epochs' if args.epochs is None else f'{args.epochs} epochs'} per run; "
        f"configs `experiments/configs/default.toml` (MNIST-1D) and `experiments/configs/digits.toml`. "
        f"Runs finished: **{by_state.get('done', 0)} of {len(runs)}**"
        + (f" ({by_state.get('partial', 0)} interrupted, {by_state.get('failed', 0)} failed, "
           f"{by_state.get('todo', 0)} not started)" if by_state.get("done", 0) < len(runs) else "")
        + ".",
        "",
        "## Machine and compute",
        "",
        *machine_info(),
        *_load_line(records, sessions),
        *_code_line(records),
        f"- compute: {len(records)} finished runs, Σ wall time of the runs {wall_sum:.0f} s = {wall_sum / 3600:.2f} "
        f"run-hours (mean {wall_sum / max(len(records), 1):.0f} s per run, subprocess start to end, single-threaded); "
        f"{len(sessions)} invocation(s) of the script, {elapsed / 60:.1f} min of elapsed wall clock in total",
        "",
        "## Results",
        "",
        "Columns as in the paper's Tables 2–5: final test accuracy (mean ± sd over seeds, mean-field network), the "
        "baseline's mean accuracy (mode `none`, same epochs), weight layers left of the baseline's, "
        "fPR = 1 − F/F_tot and pPR = 1 − P/P_tot of the final deterministic network (conv + linear MACs; "
        "parameters incl. BN pairs). Train cost: Σ_k E[F](θ_k)|B_k| over training relative to the baseline "
        "network's cost for the same samples (paper, Figure 4). Gates θ<½ left: share of the surviving gates whose "
        "θ is below ½ (but above ε, else they would be gone) after the last epoch, mean over seeds — gates still "
        "on their way out, so fPR/pPR would grow with more epochs. Train time: mean training wall clock per run "
        "(shared machine, indicative only). `–`: parameter not used by that mode (unit-only has no block gates, so "
        "δ has no effect).",
        "",
    ]
    datasets = [ds for ds in args.datasets if any(r["dataset"] == ds for r in rows)]
    for ds in datasets:
        L += [f"### {DATASET_TITLES.get(ds, ds)}", "", *results_table(rows, ds), ""]
    L += ["## Does the combined mode dominate?", "",
          "Accuracy-vs-fPR Pareto fronts from the per-setting means (both maximised). Front A dominates front B "
          "when every point of B is matched or beaten in both accuracy and fPR by some point of A, and not vice "
          "versa. Means over the seeds: differences smaller than the sd in the table are not resolved.", ""]
    for ds in datasets:
        L += [f"### {ds}", "", *dominance_text(rows, ds), ""]
    if not datasets:
        L += ["No finished runs yet.", ""]
    L += ["## Figures", ""]
    if figures:
        L += [f"- `{_rel(p)}`" for p in figures]
        L += ["", "Redraw: `python paper_figures/<name>.py --runs " + _rel(root) + " --out <dir>` for fig2_per_layer, "
              "fig3_units_left, fig4_training_cost, pareto."]
    else:
        L += ["(not drawn in this invocation)"]
    L += ["", "## The full grid", "", *estimate_full(records, args.datasets), ""]
    text = "\n".join(L)
    atomic_write_text(path, text)
    return text


def write_runs_results(root: Path, records: Sequence[dict[str, Any]], figures: Sequence[Path], path: Path,
                       command: str) -> str:
    """The tables and front comparison of every finished run under ``root`` (``--runs``: e.g. a sweep's
    folder), written atomically to ``path``."""
    rows = aggregate(records)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    L: list[str] = [
        f"# Comparison of the runs under `{_rel(root)}`",
        "",
        "*Written by `experiments/compare.py --runs`; rerun the command below to refresh it.*",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{len(records)} finished runs (every `report.json` under the folder), {len(rows)} settings. Columns as in "
        "`experiments/RESULTS.md`: mean ± sd over seeds; a sweep's further grid values follow the mode.",
        "",
        *machine_info(),
        "",
    ]
    for ds in datasets:
        arches = ", ".join(sorted({str(r.get("arch", "?")) for r in records if r["dataset"] == ds}))
        L += [f"## {ds} ({arches})", "", *results_table(rows, ds), ""]
        if len({r["mode"] for r in rows if r["dataset"] == ds} - {"none"}) > 1:
            L += ["Pareto fronts (accuracy vs fPR, per-setting means):", "", *dominance_text(rows, ds), ""]
    if not datasets:
        L += ["No finished runs yet.", ""]
    if figures:
        L += ["## Figures", "", *(f"- `{_rel(p)}`" for p in figures), ""]
    text = "\n".join(L)
    atomic_write_text(path, text)
    return text


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

FIGURE_SCRIPTS = ("pareto", "fig2_per_layer", "fig3_units_left", "fig4_training_cost")
#: colour and marker per mode, shared by every figure (baseline violet and pruned green as in the paper's Fig. 2)
MODE_STYLE = {"none": ("#6a3d9a", "*"), "layer": ("#ff7f00", "s"), "unit": ("#1f78b4", "^"),
              "combined": ("#33a02c", "o")}


def save_figure(fig: Any, out: Path, stem: str) -> list[Path]:
    """``<out>/<stem>.png`` and ``.pdf``, each written atomically; closes the figure."""
    import matplotlib.pyplot as plt

    written = []
    for ext in ("png", "pdf"):
        path = Path(out) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written


def figure_records(root: Path | str, datasets: Sequence[str] | None = None,
                   records: Sequence[dict[str, Any]] | None = None,
                   epochs: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Finished runs by dataset (all ``report.json`` under ``root`` unless ``records`` are given).

    When runs of several epoch counts are present, ``epochs`` picks one (default: the most common).
    """
    recs = list(records) if records is not None else load_records(root)
    if epochs is None and recs:
        counts: dict[int, int] = {}
        for r in recs:
            counts[r["epochs"]] = counts.get(r["epochs"], 0) + 1
        epochs = max(counts, key=lambda e: (counts[e], e))
    out: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if (datasets and r["dataset"] not in datasets) or r["epochs"] != epochs:
            continue
        out.setdefault(r["dataset"], []).append(r)
    order = list(CONFIGS)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))


def figure_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", default=str(DEFAULT_OUT), help="root of the run directories written by compare.py")
    p.add_argument("--out", default=str(DEFAULT_FIGURES), help="folder for the PNG and PDF files")
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all found)")
    p.add_argument("--epochs", type=int, default=None, help="runs of this many epochs (default: the most common)")
    return p


def figure_main(
    draw: Any, doc: str, argv: Sequence[str] | None = None, *, settings_help: str | None = None
) -> int:
    """The command line of a figure script: :func:`figure_parser` (plus ``--settings`` when the figure
    takes a choice of settings), then ``draw(runs, out, datasets=, epochs=[, settings=])``."""
    ap = figure_parser(doc)
    if settings_help is not None:
        ap.add_argument("--settings", default="", help=settings_help)
    args = ap.parse_args(argv)
    kw: dict[str, Any] = {"datasets": [d for d in args.datasets.split(",") if d] or None, "epochs": args.epochs}
    if settings_help is not None:
        kw["settings"] = [t for t in args.settings.split(",") if t] or None
    for p in draw(args.runs, args.out, **kw):
        print(p)
    return 0


def _figure_module(name: str) -> Any:
    import importlib.util

    key = f"paper_figures_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "paper_figures" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def draw_figures(root: Path, out: Path, datasets: Sequence[str], records: Sequence[dict[str, Any]] | None = None,
                 log: Any = print) -> list[Path]:
    sys.modules.setdefault("experiments_compare", sys.modules[__name__])  # the figures share this module
    written: list[Path] = []
    for name in FIGURE_SCRIPTS:
        try:
            written += _figure_module(name).draw(root, out, datasets=datasets, records=records)
        except Exception as exc:  # a figure must not lose the table
            log(f"figure {name} failed: {type(exc).__name__}: {exc}")
    return written


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=tuple(GRIDS), default="quick")
    p.add_argument("--datasets", default="mnist1d,digits", help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (each single-threaded)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="root of the run directories")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra override for every run (repeatable)")
    p.add_argument("--results", default=None,
                   help=f"markdown file written at the end (default: {_rel(DEFAULT_RESULTS)}; with --runs: "
                        "<runs>/compare.md, so the committed results are only replaced when named here)")
    p.add_argument("--figures", default=None,
                   help=f"folder of the figures ('' = none; default: {_rel(DEFAULT_FIGURES)}; with --runs: "
                        "<runs>/figures)")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="train nothing; compare every finished run under DIR (e.g. the folder of "
                        "python -m pruning sweep) in the same tables and figures")
    p.add_argument("--report-only", action="store_true", help="train nothing; aggregate the finished runs")
    p.add_argument("--retry-failed", action="store_true", help="train again runs whose last attempt failed")
    return p


def _session(root: Path, start: float, argv: list[str], elapsed: float | None, counts: dict[str, int]) -> None:
    """Record one invocation in ``<out>/compare_sessions.json`` (``elapsed_s`` None while it runs)."""
    sess = _read_json(root / SESSIONS) or {"sessions": []}
    entry = {"argv": argv, "start": start, "elapsed_s": elapsed, "counts": counts,
             "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for i, e in enumerate(sess["sessions"]):
        if e.get("start") == start:
            sess["sessions"][i] = entry
            break
    else:
        sess["sessions"].append(entry)
    atomic_write_text(root / SESSIONS, json.dumps(sess, indent=2) + "\n")


def main_runs(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--runs DIR``: the tables and figures of the finished runs under DIR; writes nothing outside DIR
    unless ``--results``/``--figures`` name another place."""
    root = Path(args.runs)
    if not root.is_dir():
        print(f"error: --runs {root}: no such folder", file=sys.stderr)
        return 2
    results = Path(args.results) if args.results is not None else root / "compare.md"
    fig_dir = Path(args.figures) if args.figures is not None else root / "figures"
    records = load_records(root)
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    figures = draw_figures(root, fig_dir, datasets, records) if args.figures != "" and records else []
    if args.results != "":
        write_runs_results(root, records, figures, results, shlex.join(["python", "experiments/compare.py", *argv]))
        print(f"wrote {results} ({len(records)} finished runs under {root})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs is not None:
        return main_runs(args, list(sys.argv[1:] if argv is None else argv))
    args.results = str(DEFAULT_RESULTS) if args.results is None else args.results
    args.figures = str(DEFAULT_FIGURES) if args.figures is None else args.figures
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in args.datasets if d not in CONFIGS]
    if bad or args.seeds < 1 or args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        print(f"error: bad arguments (unknown datasets {bad}, or seeds/jobs/epochs < 1)", file=sys.stderr)
        return 2
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    runs = plan(args.grid, args.datasets, args.seeds, args.epochs, args.set or ())
    start = time.time()
    counts: dict[str, int] = {}
    if not args.report_only:
        _session(root, start, list(sys.argv if argv is None else argv), None, counts)
    try:
        if not args.report_only:
            counts = run_grid(runs, root, jobs=args.jobs, retry_failed=args.retry_failed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.report_only:
            _session(root, start, list(sys.argv if argv is None else argv), time.time() - start, counts)
    records = load_records(root, runs)
    figures = draw_figures(root, Path(args.figures), args.datasets, records) if args.figures and records else []
    if args.results:
        write_results(args, runs, records, figures, Path(args.results))
        print(f"wrote {args.results} ({len(records)} finished runs of {len(runs)})")
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
