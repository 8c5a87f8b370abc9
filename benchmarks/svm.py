"""SVM stage: the torch solver against liblinear, per layer of a cache, in one run.

Both sides run featx's whole streamed SVM probe (l2 scaling, C chosen by 3-fold cross-validation
over 5 values, kernel form when a layer has more values than training images); only the solver
differs: `torch` solves every class, C and fold as one batched problem, `liblinear` fits
scikit-learn's LinearSVC per C and fold in threads (featx's SVM stage before the torch solver).
Then both solvers fit the same training rows at one C (the one torch chose) and their primal
objectives (LinearSVC's: squared hinge plus half the squared norm, bias included) and test
accuracies are compared.

    python benchmarks/svm.py --cache CACHE --dataset 15scene --model vgg16 \\
        --split ../shared/data/15scene-split.csv

With --baseline, sklearn's LinearSVC() with default settings on the raw features of the layer
(read whole) is timed too, in a child process stopped after --baseline-timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import LinearSVC

from featx.options import parse_memory
from featx.probes import ProbeOptions, get_probe
from featx.probes.linear import liblinear_solver, training_rows
from featx.probes.solvers import fit_squared_hinge, primal_objective_svm
from featx.probes.stream import LayerStream
from featx.study import ProbingOptions, check_dataset, find_store, split_rows

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


def same_C(stream: LayerStream, split, C: float, budget: int) -> dict:
    """Both solvers on the same training rows at one C: objectives and test accuracies."""
    training = training_rows(stream, split.train, budget)
    n_classes = len(stream.store.classes)
    ones = torch.ones((1, len(split.train)), dtype=torch.bool, device=training.x.device)
    Cs = torch.tensor([C], dtype=torch.float64)
    out = {}
    for name, solve in (("torch", fit_squared_hinge), ("liblinear", liblinear_solver(0))):
        started = time.perf_counter()
        fit = solve(training.x, training.y, ones, C=Cs, n_classes=n_classes)
        seconds = time.perf_counter() - started
        objective = primal_objective_svm(training.x, training.y, fit.coef[0], intercept=fit.intercept[0],
                                         C=C, n_classes=n_classes)
        out[name] = {"fit_s": seconds, "objective": float(objective), "coef": fit.coef[0],
                     "intercept": fit.intercept[0]}
    from featx.probes.linear import feature_weights, predict_rows

    y_true = stream.labels[split.test]
    for name in ("torch", "liblinear"):
        weights = feature_weights(stream, training, out[name].pop("coef"), budget=budget)
        predicted = predict_rows(stream, split.test, weights, intercept=out[name].pop("intercept"),
                                 budget=budget)
        out[name]["accuracy"] = float((predicted == y_true).mean())
    out["objective_gap"] = (out["torch"]["objective"] - out["liblinear"]["objective"]) / \
        abs(out["liblinear"]["objective"])
    out["accuracy_gap_points"] = 100 * (out["torch"]["accuracy"] - out["liblinear"]["accuracy"])
    return out


def compare_layer(store, name: str, args: argparse.Namespace) -> dict:
    """Both solvers through the whole probe, then at the same C; print and return the figures."""
    stream = LayerStream(store, name, "l2", device=args.device)
    options = ProbingOptions(train_per_class=args.train_per_class, seed=args.seed, split_file=args.split)
    split = split_rows(store, stream.index, options)[0]
    memory = parse_memory(args.memory)
    row = {"layer": name, "dim": stream.dim, "n_train": len(split.train), "n_test": len(split.test)}
    for solver in ("torch", "liblinear"):
        stream = LayerStream(store, name, "l2", device=args.device)  # nothing held over from the other side
        options = ProbeOptions(seed=args.seed, solver=solver, memory=memory)
        result, _ = get_probe("svm").train(stream, split, options)
        row[solver] = {"seconds": result.train_seconds, "accuracy": result.accuracy, "C": result.C,
                       "kernel_form": result.kernel_form, "converged": result.converged}
    row["speedup"] = row["liblinear"]["seconds"] / row["torch"]["seconds"]
    stream = LayerStream(store, name, "l2", device=args.device)
    row["same_C"] = {"C": row["torch"]["C"], **same_C(stream, split, row["torch"]["C"], memory)}
    t, lib, same = row["torch"], row["liblinear"], row["same_C"]
    print(f"{name:<12} dim {stream.dim:>7}  torch {t['seconds']:7.2f} s acc {t['accuracy']:.4f} "
          f"C {t['C']:g}  "
          f"liblinear {lib['seconds']:7.2f} s acc {lib['accuracy']:.4f} C {lib['C']:g}  "
          f"{row['speedup']:.2f}x | at C {same['C']:g}: objective {same['objective_gap']:+.1e} rel, "
          f"accuracy {same['accuracy_gap_points']:+.2f} points", flush=True)
    if args.baseline:
        data = store.read_layer(name)
        seconds, accuracy = timed_baseline(data.features, data.labels, split, args.baseline_timeout)
        row["baseline"] = {"seconds": seconds, "accuracy": accuracy, "timeout_s": args.baseline_timeout}
        print(f"{'':<12} LinearSVC() " + (f"{seconds:.2f} s acc {accuracy:.4f}" if seconds else
                                          f"did not finish in {args.baseline_timeout:.0f} s"), flush=True)
    return row


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
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--baseline", action="store_true", help="also time LinearSVC() on the raw layer")
    parser.add_argument("--baseline-timeout", type=float, default=900)
    args = parser.parse_args()

    store = find_store(args.cache, args.dataset, args.model, weights=args.weights)
    check_dataset(store)
    rows = []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{store.label} on {device}: featx's SVM probe with the torch solver vs liblinear")
    try:
        for name in args.layers or store.complete_layers():
            rows.append(compare_layer(store, name, args))
    finally:  # a run stopped by hand still records the layers it finished
        RESULTS.mkdir(exist_ok=True)
        record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": cpu_name(), "device": device, "torch": torch.__version__,
                  "cache": store.label, "weights": store.key.weights,
                  "split": Path(args.split).name if args.split else None,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "layers": rows}
        with open(RESULTS / "svm.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
