"""SVM speed: featx's SVM stage against sklearn's LinearSVC() with default settings, per layer of
a cache, on the same features and split, in one run.

featx: its defaults (l2 scaling, C chosen by 3-fold cross-validation over 5 values, kernel form
when a layer has more dimensions than training images). Baseline: LinearSVC() on the raw features.

    python benchmarks/svm.py --cache featx-cache --dataset 15scene --model vgg16 \\
        --split ../shared/data/15scene-split.csv --layers pool4
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

from featx.study import find_store
from featx.svm import split_rows, train_layer

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


def compare_layer(store, name: str, args: argparse.Namespace) -> dict:
    """Time featx's SVM stage and LinearSVC() on one cached layer; print and return the figures."""
    data = store.read_layer(name)
    split = split_rows(store, data.index, args.train_per_class, args.seed, args.split)[0]
    raw = data.features.copy()  # featx scales its copy in place
    ours, _ = train_layer(replace(data, features=data.features), split, seed=args.seed)
    print(f"{name:<12} dim {data.dim:>7}  featx {ours.svm_seconds:7.2f} s acc {ours.accuracy:.4f} "
          f"(C {ours.C:g}, {'kernel form' if ours.kernel_form else 'primal'})", flush=True)
    baseline_s, baseline_acc = timed_baseline(raw, data.labels, split, args.baseline_timeout)
    if baseline_acc is None:
        print(f"{'':<12} LinearSVC() did not finish in {args.baseline_timeout:.0f} s: featx is more "
              f"than {args.baseline_timeout / ours.svm_seconds:.1f}x faster", flush=True)
    else:
        print(f"{'':<12} LinearSVC() {baseline_s:7.2f} s acc {baseline_acc:.4f}  |  "
              f"{baseline_s / ours.svm_seconds:.1f}x", flush=True)
    return {"layer": name, "dim": data.dim, "n_train": len(split.train),
            "featx_s": ours.svm_seconds, "featx_accuracy": ours.accuracy, "featx_C": ours.C,
            "kernel_form": ours.kernel_form, "baseline_s": baseline_s,
            "baseline_accuracy": baseline_acc, "baseline_timeout_s": args.baseline_timeout}


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
    args = parser.parse_args()

    store = find_store(args.cache, args.dataset, args.model, args.weights)
    rows = []
    print(f"{store.label}: featx SVM stage vs LinearSVC() on the same features and split")
    try:
        for name in args.layers or store.complete_layers():
            rows.append(compare_layer(store, name, args))
    finally:  # a run stopped by hand still records the layers it finished
        RESULTS.mkdir(exist_ok=True)
        record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": cpu_name(), "cache": store.label,
                  "weights_id": store.manifest["weights_id"], "split": args.split, "layers": rows}
        with open(RESULTS / "svm.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
