"""How the mlp probe's defaults were chosen: on the training images of a fixed split only.

Each tuning split keeps 20% of each class's training images out (seeded); the probes train on the
rest (the mlp holding out its own share of those for early stopping) and are scored on the images
kept out. The test images of the split are never read. One line per setting: the mean tuning
accuracy over the tuning splits, each split's, the time and the mlp's best and last epochs.

    python benchmarks/mlp_defaults.py --cache /tmp/mlpcache --layer pool \\
        --split 15scene-split.csv --tuning-splits 5 \\
        --setting svm '{}' --setting mlp '{"lr": 0.001}' --setting mlp '{"lr": 0.003}'

Appends a JSON record per setting to benchmarks/results/mlp_defaults.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import featx
from featx.data.splits import Split
from featx.probes import ProbeOptions, get_probe, parse_probe_params
from featx.probes.stream import LayerStream
from featx.study import ProbingOptions, find_store, split_rows

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
KEPT_OUT = 0.2


def tuning_splits(train: np.ndarray, labels: np.ndarray, count: int) -> list[Split]:
    """`count` seeded splits of the training rows: KEPT_OUT of each class kept out for scoring."""
    splits = []
    for k in range(count):
        rng = np.random.default_rng(100 + k)
        kept = np.zeros(len(train), dtype=bool)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            kept[rng.permutation(rows)[:round(KEPT_OUT * len(rows))]] = True
        splits.append(Split(train[~kept], train[kept], f"tuning split {k}"))
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--split", required=True, help="the split file; only its training images are used")
    parser.add_argument("--tuning-splits", type=int, default=5)
    parser.add_argument("--setting", nargs=2, action="append", metavar=("PROBE", "PARAMS_JSON"),
                        required=True)
    args = parser.parse_args()
    store = find_store(args.cache)
    stream = LayerStream(store, args.layer, "l2", device="cpu")
    train = split_rows(store, stream.index, ProbingOptions(split_file=args.split))[0].train
    splits = tuning_splits(train, stream.labels[train], args.tuning_splits)
    for probe, given in args.setting:
        params = parse_probe_params({f"{probe}.{k}": v for k, v in json.loads(given).items()}, [probe])[probe]
        accuracies, seconds, epochs = [], [], []
        for k, split in enumerate(splits):
            started = time.perf_counter()
            result, model = get_probe(probe).train(stream, split, ProbeOptions(seed=k, params=params))
            seconds.append(time.perf_counter() - started)
            accuracies.append(result.accuracy)
            head = model[-1]
            if hasattr(head, "best_epoch_"):
                epochs.append((head.best_epoch_, head.n_epochs_))
        record = {"probe": probe, "params": params, "tuning_accuracy": float(np.mean(accuracies)),
                  "per_split": accuracies, "seconds": float(np.mean(seconds)), "epochs": epochs,
                  "layer": args.layer, "dataset": store.manifest["dataset"], "model": store.manifest["model"],
                  "tuning_splits": args.tuning_splits, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "featx": featx.__version__, "torch": torch.__version__,
                  "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        print(f"{probe} {given}: tuning accuracy {record['tuning_accuracy']:.4f} "
              f"({', '.join(f'{a:.4f}' for a in accuracies)}), {record['seconds']:.1f} s, epochs {epochs}",
              flush=True)
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "mlp_defaults.jsonl").open("a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
