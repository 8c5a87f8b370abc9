"""SVM speed: featx's SVM stage against sklearn's LinearSVC() with default settings, per layer of
a cache, on the same features and split, in one run.

featx: its defaults (l2 scaling, C chosen by 3-fold cross-validation over 5 values, kernel form
when a layer has more dimensions than training images). Baseline: LinearSVC() on the raw features.

    python benchmarks/svm.py --cache featx-cache --dataset 15scene --model vgg16 \\
        --split ../shared/data/15scene-split.csv --layers pool4

With --breakdown it times featx's stages instead (scaling, Gram matrix and factorisation, the
cross-validation fits, the final fit), and the final fit once more with liblinear's dual solver,
the one LinearSVC picks when there are fewer samples than features.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.svm import LinearSVC

from featx.probes.svm import KernelProjection, choose_C, dual_for, scale, train_layer
from featx.study import SvmOptions, find_store, split_rows

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def _fit_baseline(x: np.ndarray, y: np.ndarray, split, results) -> None:
    started = time.perf_counter()
    reference = LinearSVC().fit(x[split.train], y[split.train])
    seconds = time.perf_counter() - started
    results.put((seconds, float((reference.predict(x[split.test]) == y[split.test]).mean())))


def timed_baseline(x: np.ndarray, y: np.ndarray, split, timeout: float,
                   ) -> tuple[float | None, float | None]:
    """LinearSVC() with default settings in a child process, stopped after `timeout` seconds;
    (seconds, accuracy), or (None, None) when it did not finish."""
    context = multiprocessing.get_context("fork")  # the child shares the features, no copy
    results = context.Queue()
    child = context.Process(target=_fit_baseline, args=(x, y, split, results))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return None, None
    return results.get()


def first_split(store, data, args: argparse.Namespace):
    options = SvmOptions(train_per_class=args.train_per_class, seed=args.seed, split_file=args.split)
    return split_rows(store, data.index, options)[0]


def compare_layer(store, name: str, args: argparse.Namespace) -> dict:
    """Time featx's SVM stage and LinearSVC() on one cached layer; print and return the figures."""
    data = store.read_layer(name)
    split = first_split(store, data, args)
    raw = data.features.copy()  # featx scales its copy in place
    ours, _ = train_layer(replace(data, features=data.features), split, seed=args.seed)
    print(f"{name:<12} dim {data.dim:>7}  featx {ours.train_seconds:7.2f} s acc {ours.accuracy:.4f} "
          f"(C {ours.C:g}, {'kernel form' if ours.kernel_form else 'on the features'})", flush=True)
    baseline_s, baseline_acc = timed_baseline(raw, data.labels, split, args.baseline_timeout)
    if baseline_acc is None:
        print(f"{'':<12} LinearSVC() did not finish in {args.baseline_timeout:.0f} s: featx is more "
              f"than {args.baseline_timeout / ours.train_seconds:.1f}x faster", flush=True)
    else:
        print(f"{'':<12} LinearSVC() {baseline_s:7.2f} s acc {baseline_acc:.4f}  |  "
              f"{baseline_s / ours.train_seconds:.1f}x", flush=True)
    return {"layer": name, "dim": data.dim, "n_train": len(split.train),
            "featx_s": ours.train_seconds, "featx_accuracy": ours.accuracy, "featx_C": ours.C,
            "kernel_form": ours.kernel_form, "baseline_s": baseline_s,
            "baseline_accuracy": baseline_acc, "baseline_timeout_s": args.baseline_timeout}


def breakdown(store, name: str, args: argparse.Namespace) -> dict:
    """Time each stage of featx's SVM on one layer, and the final fit in the primal and the dual."""
    data = store.read_layer(name)
    split = first_split(store, data, args)
    times, started = {}, time.perf_counter()
    scale(data.features, split.train, "l2")
    times["scale_s"] = time.perf_counter() - started
    started = time.perf_counter()
    kernel_form = len(split.train) < data.dim
    x = KernelProjection().fit_transform(data.features, split.train) if kernel_form else data.features
    if kernel_form:
        times["gram_s"] = time.perf_counter() - started
    x_train, y_train = x[split.train], data.labels[split.train]
    started = time.perf_counter()
    C, _ = choose_C(x_train, y_train, args.seed, dual=dual_for("l2"))
    times["cv_s"] = time.perf_counter() - started
    accuracy = {}
    for solver, dual in (("primal", False), ("dual", True)):
        started = time.perf_counter()
        clf = LinearSVC(C=C, dual=dual, max_iter=5000, random_state=args.seed).fit(x_train, y_train)
        times[f"final_{solver}_s"] = time.perf_counter() - started
        accuracy[solver] = float((clf.predict(x[split.test]) == data.labels[split.test]).mean())
    print(f"{name:<12} C {C:g}: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in times.items())
          + f"; accuracy primal {accuracy['primal']:.4f}, dual {accuracy['dual']:.4f}", flush=True)
    return {"layer": name, "dim": data.dim, "kernel_form": kernel_form, "C": C, **times,
            **{f"{k}_accuracy": v for k, v in accuracy.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--layers", nargs="*", default=None, help="default: every cached layer")
    parser.add_argument("--split", default=None, help="split CSV; default: the seeded protocol")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-timeout", type=float, default=900,
                        help="seconds before LinearSVC() is stopped and reported as a lower bound")
    parser.add_argument("--breakdown", action="store_true",
                        help="time featx's stages (and the dual solver) instead of the baseline")
    args = parser.parse_args()

    store = find_store(args.cache, args.dataset, args.model, args.weights)
    rows = []
    print(f"{store.label}: " + ("featx SVM stages" if args.breakdown else
                                "featx SVM stage vs LinearSVC() on the same features and split"))
    try:
        for name in args.layers or store.complete_layers():
            rows.append((breakdown if args.breakdown else compare_layer)(store, name, args))
    finally:  # a run stopped by hand still records the layers it finished
        RESULTS.mkdir(exist_ok=True)
        record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": cpu_name(), "cache": store.label,
                  "weights": store.manifest["weights"], "split": args.split,
                  "breakdown": args.breakdown, "layers": rows}
        with open(RESULTS / "svm.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
