"""Latency objective vs FLOPs objective on one configuration, same seeds, at matched accuracy.

For each seed this trains the dense network (``model.mode = "none"``), a γ grid with the default
FLOPs/parameters cost and a γ grid with ``objective.cost = "latency"`` (the calibrated model of
``--latency-model``; calibrated first with ``python -m pruning calibrate`` if the file does not
exist), each as ``python -m pruning train`` in its own run folder.  Then it times inference of
every exported network (``export/model.pt2``) against the dense run's export, interleaved round by
round in this one process, one thread, at ``--batch``; speed-up = dense time / pruned time (median
over rounds) on the thread's CPU time (robust to other processes on a shared machine; the
wall-clock speed-up is reported beside it).  Comparison at equal accuracy: for every latency run,
the FLOPs runs' speed-up is interpolated (linearly, on the FLOPs runs sorted by accuracy) at the
latency run's accuracy — only inside the FLOPs runs' accuracy range, never extrapolated — and the gain is
``latency speed-up / FLOPs speed-up − 1`` (goal ≥ 0.15).  Writes ``results.json`` and
``results.md`` (atomically) into ``--out``.

    python experiments/latency_vs_flops.py --out runs/latency_vs_flops
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from theory.atomic import atomic_write_text  # noqa: E402

GOAL = 0.15


def _train(config: str, out: Path, sets: list[str], reuse: bool) -> dict[str, Any]:
    if reuse and (out / "report.json").exists() and (out / "export" / "model.pt2").exists():
        rep = json.loads((out / "report.json").read_text())
        old = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        return {"out": str(out), "sets": sets, "process_wall_s": old.get("process_wall_s", float("nan")),
                "process_cpu_s": old.get("process_cpu_s", float("nan")), "report": rep, "reused": True}
    cmd = [sys.executable, "-m", "pruning", "train", "--config", config, "--out", str(out), "--overwrite"]
    for s in ["train.tensorboard=false", "train.progress=false", *sets]:
        cmd += ["--set", s]
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(f"{out}.stdout", "w") as fo, open(f"{out}.stderr", "w") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time (robust to a loaded machine)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{Path(f'{out}.stderr').read_text()[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    return {"out": str(out), "sets": sets, "process_wall_s": wall, "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "report": rep}


def _time_inference(programs: dict[str, Path], input_shape: tuple[int, ...], batch: int, rounds: int,
                    iters: int) -> dict[str, dict[str, float]]:
    """Median seconds per forward of every program: ``{"cpu": thread CPU time, "wall": wall clock}``."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = {k: torch.export.load(str(p)).module() for k, p in programs.items()}
    x = torch.randn(batch, *input_shape)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in nets}
    with torch.no_grad():
        for net in nets.values():
            for _ in range(3):
                net(x)
        for _ in range(rounds):
            for k, net in nets.items():  # interleaved: every round times every network once
                c0, t0 = time.thread_time(), time.perf_counter()
                for _ in range(iters):
                    net(x)
                times[k].append(((time.thread_time() - c0) / iters, (time.perf_counter() - t0) / iters))
    return {k: {"cpu": statistics.median(c for c, _ in v), "wall": statistics.median(w for _, w in v)}
            for k, v in times.items()}


def _interp(points: list[tuple[float, float]], acc: float) -> float | None:
    """Speed-up of the FLOPs frontier at accuracy ``acc`` (linear between runs; None outside their range)."""
    pts = sorted(points)
    for (a0, s0), (a1, s1) in zip(pts, pts[1:]):
        if a0 <= acc <= a1:
            return s0 if a1 == a0 else s0 + (s1 - s0) * (acc - a0) / (a1 - a0)
    if len(pts) == 1 and abs(pts[0][0] - acc) < 1e-12:
        return pts[0][1]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/configs/default.toml")
    ap.add_argument("--out", default="runs/latency_vs_flops")
    ap.add_argument("--latency-model", default="", help="latency JSON (default: <out>/latency.json, calibrated)")
    ap.add_argument("--gammas-flops", default="0.03,0.05,0.1")
    ap.add_argument("--gammas-latency", default="0.03,0.05,0.1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at once (1 thread each)")
    ap.add_argument("--batch", type=int, default=128, help="inference batch size")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs (report + export) found in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lat = Path(args.latency_model) if args.latency_model else out / "latency.json"
    if not lat.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pruning", "calibrate", "--model", args.config, "--out", str(lat)],
                       cwd=ROOT, check=True)
        print(f"calibrated {lat} in {time.perf_counter() - t0:.0f} s", flush=True)
    lat_meta = json.loads(lat.read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs: list[tuple[str, float, int, list[str]]] = []
    for seed in seeds:
        jobs.append(("dense", 0.0, seed, ["model.mode=none"]))
        fl = [("flops", float(g), seed, [f"objective.gamma={g}"]) for g in args.gammas_flops.split(",")]
        la = [("latency", float(g), seed, [f"objective.gamma={g}", "objective.cost=latency",
                                           f"objective.latency_model={lat.resolve()}"])
              for g in args.gammas_latency.split(",")]
        for i in range(max(len(fl), len(la))):  # interleaved, so that both objectives progress together
            jobs += fl[i:i + 1] + la[i:i + 1]

    def run(job: tuple[str, float, int, list[str]]) -> dict[str, Any]:
        cost, gamma, seed, sets = job
        name = f"{cost}_g{gamma:g}_s{seed}" if cost != "dense" else f"dense_s{seed}"
        r = _train(args.config, out / name, [f"train.seed={seed}", *args.set, *sets], args.reuse)
        if not r.get("reused"):
            keep = {k: r[k] for k in ("process_wall_s", "process_cpu_s")}
            atomic_write_text(out / name / "run.json", json.dumps(keep))
        print(f"{name}: acc {r['report']['test_accuracy']:.4f}, wall {r['process_wall_s']:.0f} s, "
              f"CPU {r['process_cpu_s']:.0f} s", flush=True)
        return {"name": name, "cost": cost, "gamma": gamma, "seed": seed, **r}

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run, jobs))
    from theory.complexity import ComplexityModel
    from theory.latency import load as load_latency
    from theory.spec import load_spec

    programs = {r["name"]: Path(r["out"]) / "export" / "model.pt2" for r in runs}
    spec = load_spec(Path(runs[0]["out"]) / "export" / "spec.json")
    costs = load_latency(lat).costs("inference")
    predicted = {r["name"]: float(ComplexityModel(load_spec(Path(r["out"]) / "export" / "spec.json"),
                                                  latency=costs).latency()) for r in runs}
    times = _time_inference(programs, tuple(spec.input_shape), args.batch, args.rounds, args.iters)
    rows = []
    for r in runs:
        rep = r["report"]
        dense = next(d for d in runs if d["cost"] == "dense" and d["seed"] == r["seed"])
        rows.append({
            "name": r["name"], "cost": r["cost"], "gamma": r["gamma"], "seed": r["seed"],
            "test_accuracy": rep["test_accuracy"], "fPR": rep.get("fPR"),
            "train_wall_s": rep.get("wall_clock_s"), "train_cpu_s": r["process_cpu_s"],
            "train_cpu_ratio": r["process_cpu_s"] / dense["process_cpu_s"],
            "inference_s": times[r["name"]]["cpu"], "inference_wall_s": times[r["name"]]["wall"],
            "inference_speedup": times[dense["name"]]["cpu"] / times[r["name"]]["cpu"],
            "inference_speedup_wall": times[dense["name"]]["wall"] / times[r["name"]]["wall"],
            "predicted_speedup": predicted[dense["name"]] / predicted[r["name"]],
            "blocks_alive": rep.get("blocks_alive"),
            "units_left": sum(u.get("left", 0) for u in rep.get("units_left", [])),
        })
    comparisons = []
    for seed in seeds:
        fl = [(x["test_accuracy"], x["inference_speedup"]) for x in rows if x["cost"] == "flops" and x["seed"] == seed]
        for x in rows:
            if x["cost"] != "latency" or x["seed"] != seed:
                continue
            ref = _interp(fl, x["test_accuracy"])
            comparisons.append({"latency_run": x["name"], "accuracy": x["test_accuracy"],
                                "latency_speedup": x["inference_speedup"], "flops_speedup_at_accuracy": ref,
                                "gain": None if ref is None else x["inference_speedup"] / ref - 1})
    gains = [c["gain"] for c in comparisons if c["gain"] is not None]
    verdict = ("no latency run fell inside the FLOPs runs' accuracy range: no comparison at equal accuracy"
               if not gains else
               f"gain at equal accuracy: {', '.join(f'{g:+.1%}' for g in gains)}; goal ≥ +{GOAL:.0%}: "
               f"{'met' if min(gains) >= GOAL else ('met for some' if max(gains) >= GOAL else 'missed')}")
    result = {"config": args.config, "latency_model": str(lat), "latency_meta": {k: lat_meta.get(k) for k in (
        "device", "torch", "threads", "batch", "summary", "calibration_seconds")}, "batch": args.batch,
        "rounds": args.rounds, "iters": args.iters, "runs": rows, "comparisons": comparisons, "verdict": verdict,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    lines = [f"# Latency vs FLOPs objective ({args.config}, seeds {args.seeds}, inference batch {args.batch}, "
             "1 thread)", "", "| run | γ | test acc. | fPR | train wall s | train CPU s | train CPU / dense | "
             "blocks alive | units left | inference ms (CPU) | speed-up (CPU time) | speed-up (wall) | "
             "speed-up predicted by the latency model |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['name']} | {x['gamma']:g} | {x['test_accuracy']:.4f} | "
                     f"{(x['fPR'] or 0):.3f} | {x['train_wall_s']:.1f} | {x['train_cpu_s']:.1f} | "
                     f"{x['train_cpu_ratio']:.2f} | "
                     f"{x['blocks_alive']} | {x['units_left']} | "
                     f"{x['inference_s'] * 1e3:.3f} | {x['inference_speedup']:.2f} | "
                     f"{x['inference_speedup_wall']:.2f} | {x['predicted_speedup']:.2f} |")
    lines += ["", "| latency run | accuracy | latency speed-up | FLOPs speed-up at that accuracy | gain |",
              "|---|---|---|---|---|"]
    for c in comparisons:
        ref = "outside range" if c["flops_speedup_at_accuracy"] is None else f"{c['flops_speedup_at_accuracy']:.2f}"
        gain = "—" if c["gain"] is None else f"{c['gain']:+.1%}"
        lines.append(f"| {c['latency_run']} | {c['accuracy']:.4f} | {c['latency_speedup']:.2f} | {ref} | {gain} |")
    lines += ["", verdict, ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
