"""Sweeps: the cartesian product of a grid of configuration values × seeds, one run folder per point.

``python -m pruning sweep --config CFG --grid gamma=0.02,0.05 rho=0.2,0.8 --seeds 3 --out runs/sweep1``
trains every point of the grid (here 2 × 2 settings × 3 seeds = 12 runs) one after the other through
:func:`pruning.train.train`, each in its own run folder ``<out>/<setting>/seed<k>`` (e.g.
``runs/sweep1/gamma0.02_rho0.2/seed1``) under the folder rules of :mod:`pruning.rundir` (lock,
provenance, ``train.log``).  Then it writes the aggregate, ``<out>/results.json`` and
``<out>/results.md``: per setting the mean ± sd over seeds of the test accuracy, fPR, pPR, layers left
and the training cost Σ E[F] relative to the baseline network (THEORY §5, the paper's Figure 4).

* A grid field is any dotted configuration key (``optim.theta.lr``, ``model.kwargs.widths``, ...);
  ``gamma``, ``rho``, ``delta`` and ``lambda`` are short for ``objective.*``.  Values are TOML literals
  separated by commas (``model.kwargs.widths=[8,16],[16,32]``: commas inside brackets do not split).
  Every field and value of the grid, and every point of the product, is validated by
  :func:`pruning.config.load_config` before anything runs: a problem raises
  :class:`~pruning.config.ConfigError` naming the field (exit 2 from the command line, nothing written).
* Seeds: ``train.seed + k`` for ``k < seeds`` (``train.seed`` itself is not a grid field).
* Stopping and restarting: a finished point (``report.json``) is skipped, an interrupted one
  (a checkpoint) is resumed as ``train --resume`` would, one that left no usable checkpoint is started
  over; a point whose last attempt diverged is skipped unless ``retry_failed``.  A folder holding a run
  of another configuration, or anything that is not a run, is refused before anything runs.
* The folder of each setting also holds ``sweep_point.json`` (the setting's grid values), which lets
  ``experiments/compare.py --runs <out>`` and the figures of ``paper_figures/`` (``--runs <out>``)
  tell the settings of a sweep apart.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from theory.atomic import atomic_write_text

from .config import ConfigError, RunConfig, did_you_mean, load_config, parse_value

#: Short grid names for the user parameters of [13] and the prior precision of [2.2].
ALIASES = {"gamma": "objective.gamma", "rho": "objective.rho", "delta": "objective.delta",
           "lambda": "objective.lambda"}
SWEEP_JSON = "sweep.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
POINT_JSON = "sweep_point.json"
#: report.json key -> name in results.json; means and sds over seeds are taken of these.
METRICS = {"test_accuracy": "accuracy", "fPR": "fPR", "pPR": "pPR", "layers_left": "layers_left",
           "training_cost_ratio": "training_cost", "wall_clock_s": "train_time_s"}


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One grid field: the dotted configuration key, its values and their TOML texts as given."""

    field: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]

    @property
    def label(self) -> str:
        """The short name for ``objective.gamma`` etc., else the dotted field."""
        short = {v: k for k, v in ALIASES.items()}
        return short.get(self.field, self.field)


def split_values(text: str) -> list[str]:
    """``"0.1,[1,2],'a,b'"`` -> ``["0.1", "[1,2]", "'a,b'"]``: commas inside brackets, braces or quotes stay."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _field_name(key: str, errors: list[str], item: str) -> str | None:
    """The dotted configuration field of a grid key (aliases resolved); ``None`` (and an error) if unusable."""
    if key in ALIASES:
        return ALIASES[key]
    if "." not in key:
        errors.append(f"--grid {item!r}: unknown field {key!r}{did_you_mean(key, list(ALIASES))}; use "
                      f"{', '.join(ALIASES)} or a dotted configuration field such as objective.gamma")
        return None
    if any(not p for p in key.split(".")):
        errors.append(f"--grid {item!r}: malformed field {key!r}")
        return None
    if key == "train.seed":
        errors.append(f"--grid {item!r}: train.seed is not a grid field; use --seeds N (seeds train.seed + 0..N-1)")
        return None
    return key


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """``["gamma=0.02,0.05", "rho=0.2,0.8"]`` -> axes; malformed items, empty or repeated values and repeated
    fields raise :class:`ConfigError` (values are checked against the configuration by :func:`plan_sweep`).

    >>> [(a.field, a.values) for a in parse_grid(["gamma=0.02,0.05", "model.kwargs.widths=[8,16],[16,32]"])]
    [('objective.gamma', (0.02, 0.05)), ('model.kwargs.widths', ([8, 16], [16, 32]))]
    """
    errors: list[str] = []
    axes: list[Axis] = []
    seen: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            errors.append(f"--grid {item!r}: expected FIELD=V1,V2,... (e.g. gamma=0.02,0.05)")
            continue
        field = _field_name(key, errors, item)
        if field is None:
            continue
        if field in seen:
            errors.append(f"--grid {item!r}: field {field} is already given by {seen[field]!r}")
            continue
        seen[field] = item
        texts = split_values(text)
        if any(not t for t in texts):
            errors.append(f"--grid {item!r}: {field}: empty value in {text!r}")
            continue
        values = tuple(parse_value(t) for t in texts)
        keys = [json.dumps(v, sort_keys=True) for v in values]
        dup = sorted({t for t, k in zip(texts, keys) if keys.count(k) > 1})
        if dup:
            errors.append(f"--grid {item!r}: {field}: value{'s' if len(dup) > 1 else ''} {', '.join(dup)} "
                          "given more than once")
            continue
        axes.append(Axis(field, values, tuple(texts)))
    if errors:
        raise ConfigError(errors, "--grid")
    return axes


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "-".join(_fmt_value(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}-{_fmt_value(x)}" for k, x in v.items())
    return str(v)


def _folder_part(label: str, v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", f"{label}{_fmt_value(v)}")


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One setting of the grid: ``(field, value)`` pairs, its TOML texts and its folder name under ``out``."""

    params: tuple[tuple[str, Any], ...]
    texts: tuple[str, ...]
    name: str

    def overrides(self) -> list[str]:
        return [f"{f}={t}" for (f, _), t in zip(self.params, self.texts)]

    def values(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: what to train where (:func:`plan_sweep`)."""

    config: str | None
    overrides: tuple[str, ...]
    axes: tuple[Axis, ...]
    points: tuple[Point, ...]
    seeds: tuple[int, ...]
    out: Path
    configs: dict[tuple[str, int], RunConfig]  # (point name, seed) -> the run's configuration

    def run_dir(self, point: Point, seed: int) -> Path:
        return self.out / point.name / f"seed{seed}"

    def runs(self) -> list[tuple[Point, int]]:
        """Seed-major (every setting's first seed first), so a sweep stopped early covers every setting."""
        return [(p, s) for s in self.seeds for p in self.points]


def plan_sweep(config: str | Path | None, grid: Sequence[str], *, seeds: int = 1, out: str | Path,
               overrides: Sequence[str] = ()) -> SweepPlan:
    """Parse and validate the grid against the configuration: every field, value and point of the product.

    Raises :class:`ConfigError` naming each bad field (``--grid gamma=-1 rho=0.2: objective.gamma: must be > 0``);
    reads nothing but the configuration (and the files it names) and writes nothing.
    """
    base = load_config(config, overrides)  # the configuration without the grid must be valid on its own
    errors: list[str] = []
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        errors.append(f"--seeds: must be an integer >= 1, got {seeds!r}")
    axes = parse_grid(grid)
    if errors:
        raise ConfigError(errors, str(config) if config else "")
    seed_list = tuple(base.train.seed + k for k in range(seeds))
    seen_errors: set[str] = set()
    points: list[Point] = []
    names: dict[str, Point] = {}
    configs: dict[tuple[str, int], RunConfig] = {}
    for combo in itertools.product(*[list(zip(ax.values, ax.texts)) for ax in axes]):
        params = tuple((ax.field, v) for ax, (v, _) in zip(axes, combo))
        texts = tuple(t for _, t in combo)
        name = "_".join(_folder_part(ax.label, v) for ax, (v, _) in zip(axes, combo)) or "base"
        point = Point(params, texts, name)
        if name in names:
            errors.append(f"--grid: settings {dict(names[name].params)} and {dict(params)} would share the folder "
                          f"{name!r}; give distinct values")
            continue
        names[name] = point
        try:  # every combination (a field may constrain another, e.g. optim.weights.lr_min <= lr)
            cfg = load_config(config, [*overrides, *point.overrides()])
        except ConfigError as exc:  # each problem once, with the first setting that shows it
            where = " ".join(f"{ax.label}={t}" for ax, t in zip(axes, texts))
            errors += [f"--grid {where}: {e}" for e in exc.errors if e not in seen_errors]
            seen_errors.update(exc.errors)
            continue
        for s in seed_list:
            configs[(name, s)] = replace(cfg, train=replace(cfg.train, seed=s))
        points.append(point)
    if errors:
        raise ConfigError(errors, str(config) if config else "")
    return SweepPlan(None if config is None else str(config), tuple(overrides), tuple(axes), tuple(points),
                     seed_list, Path(out), configs)


# --------------------------------------------------------------------------------------------------
# Folder states
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_status(run_dir: Path) -> str:
    """The outcome recorded by the run's last start or resume in ``provenance.json`` (``""`` if none)."""
    from .rundir import PROVENANCE

    data = _read_json(run_dir / PROVENANCE)
    runs = data.get("runs") if isinstance(data, dict) else None
    return str(runs[-1].get("status", "")) if runs and isinstance(runs[-1], dict) else ""


def run_state(plan: SweepPlan, point: Point, seed: int) -> str:
    """``done``, ``diverged`` (last attempt), ``resume`` (a usable checkpoint), ``restart`` (a run without
    one) or ``new``; :class:`~pruning.rundir.RunDirError` for a folder that must not be used."""
    from .checkpoint import check_resume_config
    from .config import from_dict
    from .report import REPORT_JSON
    from .rundir import RunDirError, inspect_folder

    d = plan.run_dir(point, seed)
    state = inspect_folder(d)
    if state.kind == "file":
        raise RunDirError(f"{d} is a file, not a run folder")
    if state.kind == "foreign":
        raise RunDirError(f"{d} is not empty and is not a run of this toolkit (it holds: "
                          f"{', '.join(state.entries[:8])}); move it away or use another --out")
    if state.kind != "run":
        return "new"
    if state.checkpoint is not None:
        try:
            check_resume_config(from_dict(state.checkpoint["config"]), plan.configs[(point.name, seed)])
        except (ValueError, KeyError) as exc:
            why = str(exc).rpartition("checkpoint's in ")[2] or str(exc)
            raise RunDirError(f"{d} holds a run of another configuration ({why} differ); use another --out") from None
        if state.finished and (d / REPORT_JSON).is_file():
            return "done"
    if _last_status(d) == "diverged":
        return "diverged"
    return "resume" if state.checkpoint is not None else "restart"


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: counts by outcome, failures, and the exit code of the command line."""

    counts: dict[str, int]
    failures: list[str]
    interrupted: int = 0  # the exit code of a stop on SIGINT/SIGTERM (128 + signal), else 0
    results: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return self.interrupted or (1 if self.failures else 0)


def run_sweep(plan: SweepPlan, *, retry_failed: bool = False, argv: Sequence[str] | None = None,
              log: Callable[[str], Any] = print) -> SweepOutcome:
    """Train every run of ``plan`` that is not finished, one at a time, then write the aggregate.

    Every folder is checked first (:func:`run_state`): a refused one raises
    :class:`~pruning.rundir.RunDirError` before anything is trained.  A run that diverges or fails is
    recorded and the sweep goes on; SIGINT/SIGTERM stop it after the current run's checkpoint
    (``interrupted`` = 128 + signal); the aggregate is written in every case.
    """
    from .interrupt import RunInterrupted
    from .rundir import RunDirError, inspect_folder
    from .train import TrainingDiverged, train

    kind = inspect_folder(plan.out).kind
    if kind in ("run", "file"):
        raise RunDirError(f"--out {plan.out} is {'a file' if kind == 'file' else 'the folder of one run'}, not a "
                          "sweep folder; choose a new folder (or the folder of an earlier sweep)")
    runs = plan.runs()
    states = {(p.name, s): run_state(plan, p, s) for p, s in runs}  # RunDirError: nothing written yet
    wanted = ("new", "resume", "restart", "diverged") if retry_failed else ("new", "resume", "restart")
    todo = [(p, s) for p, s in runs if states[(p.name, s)] in wanted]
    counts = {"finished before": sum(1 for v in states.values() if v == "done"), "trained": 0, "failed": 0,
              "diverged before": sum(1 for p, s in runs if states[(p.name, s)] == "diverged" and (p, s) not in todo)}
    failures = [f"{plan.run_dir(p, s)}: diverged in an earlier attempt (--retry-failed to train it again)"
                for p, s in runs if states[(p.name, s)] == "diverged" and (p, s) not in todo]
    log(f"sweep: {len(plan.points)} setting(s) × {len(plan.seeds)} seed(s) = {len(runs)} runs in {plan.out}: "
        f"{counts['finished before']} finished already, {len(todo)} to train")
    write_manifest(plan, argv)
    cmd = ["python", "-m", "pruning", *(argv or ["sweep"])]
    outcome = SweepOutcome(counts, failures)
    for i, (point, seed) in enumerate(todo, 1):
        d = plan.run_dir(point, seed)
        state = states[(point.name, seed)]
        resume = state == "resume"
        what = {"new": "", "resume": " (resuming)", "restart": " (starting over: no usable checkpoint)",
                "diverged": " (again: diverged before)"}[state]
        log(f"[{i}/{len(todo)}] {point.name} seed {seed}{what}")
        _write_point(plan, point)
        t0 = time.perf_counter()
        try:
            report = train(plan.configs[(point.name, seed)], d, resume=resume, overwrite=not resume and state != "new",
                           argv=cmd)
        except RunInterrupted as stop:  # SIGINT/SIGTERM during training: a checkpoint at the current step
            log(f"  stopped: {stop}; run the same sweep command again to continue")
            outcome.interrupted = stop.exit_code
            break
        except KeyboardInterrupt:  # Ctrl-C outside a training step (start-up, data loading)
            log("  stopped (Ctrl-C); run the same sweep command again to continue")
            outcome.interrupted = 130
            break
        except ConfigError:  # the network does not fit the data etc.: every later run would fail alike
            write_results(plan)
            raise
        except (TrainingDiverged, ValueError, RuntimeError) as exc:  # RunDirError/CheckpointError are ValueErrors
            kind = "diverged" if isinstance(exc, TrainingDiverged) else f"failed ({type(exc).__name__})"
            counts["failed"] += 1
            failures.append(f"{d}: {kind}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log(f"  {kind}: {exc}")
            continue
        counts["trained"] += 1
        log(f"  acc {100 * report['test_accuracy']:.2f} %, fPR {100 * report['fPR']:.1f} %, "
            f"pPR {100 * report['pPR']:.1f} %, layers {report['layers_left']}/{report['baseline_layers']}, "
            f"training cost {report['training_cost_ratio']:.3f} ({time.perf_counter() - t0:.0f} s)")
    outcome.results = write_results(plan, failures=failures)
    log(f"sweep: wrote {plan.out / RESULTS_JSON} and {plan.out / RESULTS_MD} "
        f"({outcome.results['runs_finished']} of {len(runs)} runs finished)")
    return outcome


def write_manifest(plan: SweepPlan, argv: Sequence[str] | None = None) -> Path:
    """``<out>/sweep.json``: the configuration, overrides, grid, seeds and settings of the sweep (atomically)."""
    path = plan.out / SWEEP_JSON
    atomic_write_text(path, json.dumps(_describe(plan, argv), indent=2) + "\n")
    return path


def _describe(plan: SweepPlan, argv: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "config": plan.config,
        "overrides": list(plan.overrides),
        "grid": {ax.field: list(ax.values) for ax in plan.axes},
        "seeds": list(plan.seeds),
        "settings": [p.name for p in plan.points],
        **({"command": ["python", "-m", "pruning", *argv]} if argv else {}),
    }


def _write_point(plan: SweepPlan, point: Point) -> None:
    path = plan.out / point.name / POINT_JSON
    atomic_write_text(path, json.dumps({"setting": point.name, "params": point.values()}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Aggregate
# --------------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def aggregate(plan: SweepPlan) -> list[dict[str, Any]]:
    """Per setting: each the paper's numbers (from its ``report.json``) and their mean and sd (ddof 1) over seeds."""
    from .report import REPORT_JSON

    rows = []
    for point in plan.points:
        runs = []
        for seed in plan.seeds:
            d = plan.run_dir(point, seed)
            rep = _read_json(d / REPORT_JSON)
            if not isinstance(rep, dict):
                runs.append({"seed": seed, "dir": str(d), "finished": False})
                continue
            runs.append({"seed": seed, "dir": str(d), "finished": True,
                         "baseline_layers": rep.get("baseline_layers"),
                         **{name: _finite(rep.get(key)) for key, name in METRICS.items()}})
        done = [r for r in runs if r["finished"]]
        row: dict[str, Any] = {"setting": point.name, "params": point.values(), "n": len(done),
                               "seeds": [r["seed"] for r in done], "runs": runs,
                               "baseline_layers": done[0]["baseline_layers"] if done else None,
                               "mean": {}, "sd": {}}
        for name in METRICS.values():
            xs = [r[name] for r in done if r[name] is not None]
            row["mean"][name] = statistics.fmean(xs) if xs else None
            row["sd"][name] = statistics.stdev(xs) if len(xs) > 1 else None
        rows.append(row)
    return rows


def write_results(plan: SweepPlan, *, failures: Sequence[str] = ()) -> dict[str, Any]:
    """``<out>/results.json`` and ``<out>/results.md`` from the finished runs (each file written atomically)."""
    rows = aggregate(plan)
    total = len(plan.points) * len(plan.seeds)
    finished = sum(r["n"] for r in rows)
    results = {"sweep": _describe(plan), "runs_total": total, "runs_finished": finished,
               "complete": finished == total, "failures": list(failures), "settings": rows}
    atomic_write_text(plan.out / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    atomic_write_text(plan.out / RESULTS_MD, results_markdown(plan, results))
    return results


def _pm(m: float | None, sd: float | None, scale: float, digits: int) -> str:
    if m is None:
        return "–"
    return f"{scale * m:.{digits}f}" + ("" if sd is None else f" ± {scale * sd:.{digits}f}")


def results_markdown(plan: SweepPlan, results: dict[str, Any]) -> str:
    """The table of ``results.md``: one row per setting, mean ± sd over the finished seeds."""
    heads = [ax.label for ax in plan.axes]
    lines = [
        f"# Sweep: {plan.config or 'the default configuration'}",
        "",
        "Grid: " + (", ".join(f"`{ax.label}={','.join(ax.texts)}`" for ax in plan.axes) or "none") + "; "
        f"{len(plan.points)} setting(s) × seeds {', '.join(map(str, plan.seeds))}; runs finished: "
        f"**{results['runs_finished']} of {results['runs_total']}**."
        + (f" Overrides for every run: `{' '.join(plan.overrides)}`." if plan.overrides else ""),
        "",
        "Mean ± sd over the finished seeds (sd from two seeds on). Test accuracy of the mean-field network; "
        "fPR = 1 − F/F_tot and pPR = 1 − P/P_tot of the final deterministic network; training cost: "
        "Σ_k E[F](θ_k)|B_k| relative to the baseline network's for the same samples.",
        "",
        "| " + " | ".join([*heads, "Test acc (%)", "fPR (%)", "pPR (%)", "Layers left", "Train cost",
                          "Train time (s)", "Seeds"]) + " |",
        "|" + "---:|" * (len(heads) + 7),
    ]
    for r in results["settings"]:
        m, sd = r["mean"], r["sd"]
        layers = _pm(m["layers_left"], sd["layers_left"], 1.0, 1)
        if r["baseline_layers"] is not None and m["layers_left"] is not None:
            layers += f" / {r['baseline_layers']}"
        cells = [*(_fmt_value(r["params"][ax.field]) for ax in plan.axes),
                 _pm(m["accuracy"], sd["accuracy"], 100.0, 2), _pm(m["fPR"], sd["fPR"], 100.0, 1),
                 _pm(m["pPR"], sd["pPR"], 100.0, 1), layers, _pm(m["training_cost"], sd["training_cost"], 1.0, 3),
                 _pm(m["train_time_s"], None, 1.0, 0), f"{r['n']}/{len(plan.seeds)}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results["failures"]:
        lines += ["", "Failed runs:", "", *(f"- {f}" for f in results["failures"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def sweep_grid(config: str | Path | None, grid: Sequence[str], *, out: str | Path, seeds: int = 1,
          overrides: Sequence[str] = (), retry_failed: bool = False,
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train the cartesian product of ``grid`` × ``seeds`` in ``out`` and return the aggregate (results.json).

    ``grid``: ``"FIELD=V1,V2,..."`` strings (``gamma``/``rho``/``delta``/``lambda`` or any dotted
    configuration field); ``overrides``: ``--set`` strings for every run.  Validation raises
    :class:`~pruning.config.ConfigError` before anything runs; a folder that must not be used raises
    :class:`~pruning.rundir.RunDirError`.  Calling it again continues the sweep: finished runs are
    skipped, interrupted ones resumed.  Runs that fail are listed in ``results["failures"]``.

    >>> import pruning
    >>> res = pruning.sweep_grid("experiments/configs/default.toml", ["gamma=0.02,0.05", "rho=0.2,0.8"],
    ...                          seeds=3, out="runs/sweep1")                          # doctest: +SKIP
    >>> [(s["params"], s["mean"]["accuracy"], s["mean"]["fPR"]) for s in res["settings"]]  # doctest: +SKIP
    """
    plan = plan_sweep(config, grid, seeds=seeds, out=out, overrides=overrides)
    outcome = run_sweep(plan, retry_failed=retry_failed, log=log)
    assert outcome.results is not None
    return outcome.results


def main(args: Any) -> int:
    """``python -m pruning sweep``: exit 0 when every run finished, 1 when some failed, 2 for a refused
    configuration, grid or folder (nothing trained), 128 + signal after SIGINT/SIGTERM."""
    from .rundir import RunDirError

    out = Path(args.out) if args.out else Path("runs") / f"sweep_{Path(args.config).stem if args.config else 'default'}"
    try:
        plan = plan_sweep(args.config, args.grid or [], seeds=args.seeds, out=out, overrides=args.set or [])
        if args.report_only:
            if not (out / SWEEP_JSON).is_file():
                print(f"error: --report-only: {out} holds no sweep ({out / SWEEP_JSON} is missing)", file=sys.stderr)
                return 2
            results = write_results(plan)
            print(f"wrote {out / RESULTS_JSON} and {out / RESULTS_MD} ({results['runs_finished']} of "
                  f"{results['runs_total']} runs finished)")
            return 0
        outcome = run_sweep(plan, retry_failed=args.retry_failed, argv=getattr(args, "argv", None),
                            log=lambda s: print(s, flush=True))
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for f in outcome.failures:
        print(f"failed: {f}", file=sys.stderr)
    return outcome.exit_code


__all__ = ["ALIASES", "Axis", "Point", "SweepOutcome", "SweepPlan", "aggregate", "parse_grid", "plan_sweep",
           "run_sweep", "split_values", "sweep_grid", "write_results"]
