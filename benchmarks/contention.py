"""The SVM probe on a shared machine: the torch solver, liblinear and `auto` side by side, with 0, 2
and 8 busy processes beside them (each spinning a numpy matmul or a pure-Python loop).

Two problems:
- demo: EfficientNet-Lite0's four default layers (192, 320, 1280 and 1000 values) of data/demo,
  extracted into a temporary cache with the real Lite0 weights; 48 training rows (12 per class),
  48 test rows, so every layer is fitted in kernel form;
- synthetic: a 15-Scene-sized layer (benchmarks/synthetic.py): 1,500 training rows of 1,280 values,
  15 classes, 2,985 test rows, fitted in the primal.

Each time is featx's whole probe on the layer (reading it, C among 5 values by 3-fold
cross-validation, the final fit, the test scores), as the table's Train Time column reports it,
under featx's thread policy; a demo layer's is the median of 5 runs. For each point the script
prints the three times, the solver auto chose, auto's time over the faster solver's, and the
time of the solver auto chose, in its own run, over the faster one's: the cost of the choice
without the noise between two runs of the same solve, which a shared machine makes large.
--before adds the torch solver as it ran before the thread policy (on torch's own thread count
whatever the work and the load) on the demo.

    python benchmarks/contention.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from load import busy, load_average
from synthetic import synthetic_store

from featx import __version__
from featx.probes import ProbeOptions, get_probe, threads
from featx.probes.stream import LayerStream
from featx.study import ProbingOptions, extract, split_rows

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
SOLVERS = ("torch", "liblinear", "auto")


@contextmanager
def policy_off():
    """The probes' threads as before the thread policy: torch's own count for every operation
    (an operation of any size is worth all the threads)."""
    saved = threads.FLOPS_PER_THREAD, threads.runnable_tasks
    threads.FLOPS_PER_THREAD, threads.runnable_tasks = 1e-30, lambda: None
    try:
        yield
    finally:
        threads.FLOPS_PER_THREAD, threads.runnable_tasks = saved


def problems(folder: Path) -> dict[str, list[tuple[object, str, object]]]:
    """{problem: [(store, layer, split)]}: the demo's four layers and the synthetic layer."""
    demo = extract(DEMO, "efficientnet_lite0", weights="imagenet", cache=folder / "demo", progress=None)
    rows = []
    for name in demo.complete_layers():
        stream = LayerStream(demo, name, device="cpu")
        rows.append((demo, name, split_rows(demo, stream.index, ProbingOptions())[0]))
    store, split = synthetic_store(folder / "synthetic")
    return {"demo": rows, "synthetic": [(store, "layer", split)]}


def probe_seconds(store, layer: str, split, solver: str, repeat: int = 1) -> tuple[float, str]:
    """featx's SVM probe on one layer: its time (the median of `repeat` runs) and the solver that
    fitted it (the last run's)."""
    seconds = []
    for _ in range(repeat):
        result, _ = get_probe("svm").train(LayerStream(store, layer, device="cpu"), split,
                                           ProbeOptions(solver=solver))
        seconds.append(result.train_seconds)
    return sorted(seconds)[len(seconds) // 2], result.solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", default="0,2,8", help="busy processes beside the probes, comma-separated")
    parser.add_argument("--before", action="store_true",
                        help="also the demo with the torch solver on torch's own thread count")
    parser.add_argument("--problems", default="demo,synthetic", help="which problems, comma-separated")
    args = parser.parse_args()
    counts = [int(c) for c in args.busy.split(",")]
    wanted = args.problems.split(",")

    started = time.perf_counter()
    print(f"{cpu_name()}; featx {__version__}, torch {torch.__version__}; {threads.available_cores()} cores "
          f"featx may use, torch's own count {torch.get_num_threads()}; load {load_average():.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: layers for name, layers in problems(Path(tmp)).items() if name in wanted}
        for solver in SOLVERS:  # warm-up: imports and first calls, untimed
            probe_seconds(*next(iter(cases.values()))[0], solver)
        for count in counts:
            with busy(count):
                load = load_average()
                for problem, layers in cases.items():
                    for store, layer, split in layers:
                        row = {"busy": count, "load": load, "problem": problem, "layer": layer,
                               "dim": store.manifest["layers"][layer]["dim"]}
                        repeat = 5 if problem == "demo" else 1  # a fraction of a second: the median of 5
                        for solver in SOLVERS:
                            row[solver], picked = probe_seconds(store, layer, split, solver, repeat)
                        row["auto_picked"] = picked
                        if args.before and problem == "demo":
                            with policy_off():
                                row["torch_before"] = probe_seconds(store, layer, split, "torch", repeat)[0]
                        faster = min(row["torch"], row["liblinear"])
                        row["auto_over_faster"] = row["auto"] / faster
                        row["pick_over_faster"] = row[picked] / faster  # the choice's cost, without
                        # the noise between two runs of the same solve
                        rows.append(row)
                        before = ("" if "torch_before" not in row
                                  else f"  torch before {row['torch_before']:6.2f} s")
                        print(f"busy {count} (load {load:4.1f}) {problem:<9} {layer:<12} {row['dim']:>5}: "
                              f"torch {row['torch']:6.2f} s  liblinear {row['liblinear']:6.2f} s  auto "
                              f"{row['auto']:6.2f} s ({picked}: {row['auto_over_faster']:.2f}x the faster; "
                              f"{picked} run alone {row['pick_over_faster']:.2f}x)"
                              f"{before}", flush=True)
    worst = max(rows, key=lambda r: r["auto_over_faster"])
    regret = max(rows, key=lambda r: r["pick_over_faster"])
    demo_two = [r for r in rows if r["problem"] == "demo" and r["busy"] == 2]
    slowest = max((max(r["torch"], r["liblinear"], r["auto"]) for r in demo_two), default=float("nan"))
    print(f"auto over the faster solver: at most {worst['auto_over_faster']:.2f}x ({worst['problem']} "
          f"{worst['layer']}, busy {worst['busy']}); the solver auto picked, in its own run, at most "
          f"{regret['pick_over_faster']:.2f}x ({regret['problem']} {regret['layer']}, busy "
          f"{regret['busy']}); slowest demo layer with 2 busy processes: {slowest:.2f} s; run "
          f"{time.perf_counter() - started:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "contention.jsonl", "a") as f:
        f.write(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": cpu_name(), "featx": __version__, "torch": torch.__version__,
                            "cores": threads.available_cores(), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
