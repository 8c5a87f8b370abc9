"""The constants of `--solver auto`'s cost model (featx.probes.costs) and of the thread policy
(featx.probes.threads), measured on this machine.

Solvers: for each problem (synthetic layers of several shapes, in kernel form and in the primal,
and every layer of the caches given with --cache, on featx's default seeded split), the SVM
probe's solve stage (C chosen among 5 values by 3-fold cross-validation, then the final fit) is
timed with the torch solver on one thread and with liblinear on one worker. The constants are the
least-squares fit of log(estimate / measurement) (relative errors count alike, from 0.05 s to
20 s); the script prints them, each problem's estimate against its measurement, and whether the
model picks the faster solver (liblinear's workers taken as sharing its fits evenly).

Threads: operations like the torch solver's (a matrix product, elementwise steps, the product
back) of growing size, timed on one and two threads, alone and with two busy processes beside
them; FLOPS_PER_THREAD is set where two threads stop losing with the cores taken.

    python benchmarks/solver_cost.py --cache DEMO_CACHE --cache SCENE_CACHE
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from load import busy, load_average
from scipy.optimize import least_squares
from synthetic import synthetic_store

from featx import __version__
from featx.probes import ProbeOptions, costs
from featx.probes.linear import choose_C, liblinear_solver, solve_shape, training_rows
from featx.probes.solvers import fit_squared_hinge
from featx.probes.stream import LayerStream
from featx.probes.svm import C_GRID
from featx.probes.threads import running_on
from featx.study import ProbingOptions, find_store, split_rows

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
# (values, classes, training rows per class): kernel form where values > training rows
SYNTHETIC = [(4096, 15, 10), (4096, 15, 20), (2048, 15, 40), (1024, 4, 12),
             (80, 15, 100), (320, 15, 100), (1280, 15, 100), (256, 15, 40), (128, 4, 100)]


def time_solve(training, shape, n_classes: int, solver: str) -> float:
    """Seconds of the solve stage (choose C, then the final fit) on one thread or worker."""
    solve = fit_squared_hinge if solver == "torch" else liblinear_solver(0, 1)
    ones = torch.ones((1, len(training.labels)), dtype=torch.bool)
    with running_on(1):
        started = time.perf_counter()
        C, _ = choose_C(training, C_GRID, n_classes, seed=0, solve=solve)
        solve(training.x, training.y, ones, C=torch.tensor([C], dtype=torch.float64), n_classes=n_classes)
        return time.perf_counter() - started


def measure(stream: LayerStream, split, label: str) -> dict:
    shape = solve_shape(stream, split, ProbeOptions(), grid=C_GRID)
    training = training_rows(stream, split.train, 1 << 30)
    n_classes = len(stream.store.classes)
    point = {"problem": label, "rows": shape.rows, "width": shape.width, "classes": shape.classes,
             "problems": shape.problems, "kernel_form": shape.kernel_form,
             **{f"{s}_s": time_solve(training, shape, n_classes, s) for s in ("torch", "liblinear")}}
    print(f"{label:<34} {shape.form:>6} rows {shape.rows:>5} width {shape.width:>5} classes "
          f"{shape.classes:>3}: torch {point['torch_s']:6.2f} s, liblinear {point['liblinear_s']:6.2f} s",
          flush=True)
    return point


def fit_constants(points: list[dict]) -> dict:
    """Least squares of log(estimate / measured) for each solver: its fixed cost (torch: per
    solve; liblinear: per fit), its rate in kernel form and in the primal, and its exponent."""
    work = np.array([costs.SolveShape(p["rows"], p["width"], p["classes"], p["problems"],
                                      p["kernel_form"]).work for p in points]) / costs.WORK_UNIT
    kernel = np.array([p["kernel_form"] for p in points])
    fitted = {}
    for solver in ("torch", "liblinear"):
        measured = np.array([p[f"{solver}_s"] for p in points])
        first = np.ones(len(points)) if solver == "torch" else np.array([p["problems"] for p in points])

        def log_ratio(q: np.ndarray, first=first, measured=measured) -> np.ndarray:
            fixed, rate_kernel, rate_primal, exponent = np.exp(q[0]), np.exp(q[1]), np.exp(q[2]), q[3]
            estimate = first * fixed + np.where(kernel, rate_kernel, rate_primal) * work ** exponent
            return np.log(estimate / measured)

        q = least_squares(log_ratio, x0=[np.log(0.01), np.log(0.01), np.log(0.01), 1.0]).x
        fitted[solver] = (float(np.exp(q[0])), float(np.exp(q[1])), float(np.exp(q[2])), float(q[3]))
    t_fixed, t_kernel, t_primal, t_exp = fitted["torch"]
    l_fixed, l_kernel, l_primal, l_exp = fitted["liblinear"]
    return {"TORCH_FIXED": t_fixed, "TORCH_SECONDS": {"kernel": t_kernel, "primal": t_primal},
            "TORCH_EXPONENT": t_exp, "LIBLINEAR_PER_FIT": l_fixed,
            "LIBLINEAR_SECONDS": {"kernel": l_kernel, "primal": l_primal}, "LIBLINEAR_EXPONENT": l_exp}


def report_fit(points: list[dict], constants: dict) -> None:
    """Each problem's estimates (with `constants`, on one thread each) against the measurements."""
    saved = {name: getattr(costs, name) for name in constants}
    for name, value in constants.items():
        setattr(costs, name, value)
    try:
        right = 0
        for p in points:
            shape = costs.SolveShape(p["rows"], p["width"], p["classes"], p["problems"], p["kernel_form"])
            est = {"torch": costs.torch_seconds(shape, 1), "liblinear": costs.liblinear_seconds(shape, 1)}
            picked, faster = min(est, key=est.get), min(("torch", "liblinear"), key=lambda s: p[f"{s}_s"])
            lost = p[f"{picked}_s"] / p[f"{faster}_s"]
            right += picked == faster or lost <= 1.2
            print(f"  {p['problem']:<34} torch est/measured {est['torch'] / p['torch_s']:5.2f}, liblinear "
                  f"{est['liblinear'] / p['liblinear_s']:5.2f}; picks {picked:<9} ({lost:.2f}x the faster)")
        print(f"  the pick is the faster or within 1.2x of it on {right} of {len(points)} problems")
    finally:
        for name, value in saved.items():
            setattr(costs, name, value)


def thread_check() -> list[dict]:
    """Operations shaped like the solver's (scores, five elementwise steps, the product back),
    on one and two threads, alone and with two busy processes beside them."""
    rows = []
    sizes = [(60, 500, 200), (225, 1500, 1281), (480, 3000, 2049), (1600, 5000, 2049)]
    for count in (0, 2):
        with busy(count):
            for m, n, d in sizes:
                x, w = torch.randn(n, d), torch.randn(m, d)
                seconds = {}
                for threads in (1, 2):
                    with running_on(threads):
                        reps, started = 0, time.perf_counter()
                        while time.perf_counter() - started < 1.5:
                            z = w @ x.T
                            for _ in range(5):
                                z = (1 - z).clamp_min_(0) * 0.5
                            z @ x
                            reps += 1
                        seconds[threads] = (time.perf_counter() - started) / reps
                row = {"busy": count, "gflop": 2 * m * n * d / 1e9, "one_s": seconds[1], "two_s": seconds[2]}
                rows.append(row)
                print(f"busy {count}: an operation of {row['gflop']:6.2f} GFLOP: one thread "
                      f"{1e3 * seconds[1]:8.1f} ms, two {1e3 * seconds[2]:8.1f} ms "
                      f"({seconds[1] / seconds[2]:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", action="append", default=[],
                        help="a featx cache (repeat for several): each of its layers is a problem")
    parser.add_argument("--no-synthetic", action="store_true", help="the caches' layers only")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread check")
    args = parser.parse_args()

    print(f"{cpu_name()}, featx {__version__}, torch {torch.__version__}; load {load_average():.1f}")
    points = []
    for folder in args.cache:
        store = find_store(folder)
        for name in store.complete_layers():
            stream = LayerStream(store, name, "l2", device="cpu")
            split = split_rows(store, stream.index, ProbingOptions())[0]
            points.append(measure(stream, split, f"{store.label} {name}"))
    if not args.no_synthetic:
        for dim, classes, per_class in SYNTHETIC:
            with tempfile.TemporaryDirectory() as tmp:
                store, split = synthetic_store(Path(tmp), dim=dim, classes=classes,
                                               train_per_class=per_class, test=classes * 10)
                points.append(measure(LayerStream(store, "layer", "l2", device="cpu"), split,
                                      f"synthetic {dim} x {classes} x {per_class}"))
    constants = fit_constants(points)
    print("fitted: " + json.dumps(constants))
    report_fit(points, constants)
    threads = [] if args.no_threads else thread_check()
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "solver_cost.jsonl", "a") as f:
        f.write(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": cpu_name(), "featx": __version__, "torch": torch.__version__,
                            "points": points, "constants": constants, "threads": threads}) + "\n")


if __name__ == "__main__":
    main()
