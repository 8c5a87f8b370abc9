"""The mlp probe: a hidden layer trained on the streamed rows, early stopping on held-out training
rows, seeded, within the memory budget, in the CLI, the tables, the plots and the page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.base import clone

from featx.cache.store import FeatureStore
from featx.data.splits import Split
from featx.errors import FeatxError
from featx.probes import ProbeOptions, get_probe
from featx.probes.mlp import HeadSettings, MLPHead, _validation_score, fit_head, held_out_rows, train_head
from featx.probes.stream import LayerStream

from conftest import array_store, assert_clean_error, problem, read_predictions, run_cli


def train(store: FeatureStore, split: Split, probe: str = "mlp", *, memory: int = 1 << 30, **options):
    stream = LayerStream(store, "layer", "l2", device="cpu")
    return get_probe(probe).train(stream, split, ProbeOptions(memory=memory, **options))


@pytest.fixture
def separable(tmp_path):
    """Four classes of 40 rows of 100 values, half of each class for training."""
    x, y, split = problem(n_per_class=40, dim=100, classes=4, separation=0.3)
    return array_store(tmp_path / "cache", {"layer": x}, y), x, y, split


def test_the_mlp_beats_chance_and_matches_the_svm(separable) -> None:
    store, x, y, split = separable
    svm, _ = train(store, split, "svm")
    mlp, model = train(store, split)
    assert mlp.probe == "mlp" and mlp.C is None and not mlp.kernel_form and mlp.n_train == len(split.train)
    assert mlp.accuracy >= 0.75  # three times chance (one in four)
    assert abs(mlp.accuracy - svm.accuracy) <= 0.05
    assert mlp.balanced_accuracy == pytest.approx(mlp.accuracy, abs=0.05)  # balanced test set
    # the saved model applies to raw rows: the stream's scaling, then the head
    assert np.array_equal(model.predict(x[split.test]), np.asarray(mlp.y_pred))
    assert model.named_steps["mlp"].coefs_[0].shape == (100, 1024)  # the default width
    assert model.predict_proba(x[split.test]).sum(1) == pytest.approx(1.0)


def test_one_seed_gives_one_head_and_another_seed_another(separable) -> None:
    store, _, _, split = separable
    params = {"hidden": 128, "epochs": 30}
    first, a = train(store, split, seed=3, params=params)
    again, b = train(store, split, seed=3, params=params)
    other, c = train(store, split, seed=4, params=params)
    heads = [m.named_steps["mlp"] for m in (a, b, c)]
    assert np.array_equal(first.y_pred, again.y_pred)
    assert all(np.array_equal(p, q) for p, q in zip(heads[0].coefs_ + heads[0].intercepts_,
                                                    heads[1].coefs_ + heads[1].intercepts_))
    assert heads[0].best_epoch_ == heads[1].best_epoch_
    assert not np.array_equal(heads[0].coefs_[0], heads[2].coefs_[0])


def test_early_stopping_returns_the_best_epochs_weights() -> None:
    x, y, _ = problem(n_per_class=30, dim=50, classes=3, separation=0.25, seed=1)
    x = torch.as_tensor(x / np.linalg.norm(x, axis=1, keepdims=True))
    y = torch.as_tensor(y)
    validation = held_out_rows(y.numpy(), 0.3, seed=0)
    assert np.bincount(y.numpy()[validation]).tolist() == [9, 9, 9]  # stratified
    settings = HeadSettings(hidden=64, dropout=0.0, lr=1e-2, patience=5, epochs=500)
    fit = fit_head(x, y, validation, n_classes=3, settings=settings, seed=0)
    assert fit.stopped_early and fit.epochs_run == fit.best_epoch + settings.patience
    best = max(fit.history, key=lambda score: (score[0], -score[1]))
    assert fit.history[fit.best_epoch - 1] == best != fit.history[-1]  # it got worse after the best
    rows = torch.as_tensor(np.flatnonzero(validation))
    accuracy, loss = _validation_score(x, y, rows, fit.weights)
    assert (accuracy, loss) == pytest.approx(best, rel=1e-5)
    assert (fit.validation_accuracy, fit.validation_loss) == pytest.approx(best, rel=1e-5)


def test_refit_trains_a_new_head_on_every_row_for_the_best_epoch_count() -> None:
    x, y, _ = problem(n_per_class=30, dim=40, classes=3, separation=0.25, seed=2)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    validation = held_out_rows(y.numpy(), 0.2, seed=0)
    settings = HeadSettings(hidden=32, patience=5, refit=1)
    refit = train_head(x, y, validation, n_classes=3, settings=settings, seed=0)
    kept = train_head(x, y, validation, n_classes=3, settings=replace(settings, refit=0), seed=0)
    assert refit.best_epoch == kept.best_epoch and refit.stopped_early
    every_row = fit_head(x, y, np.zeros(len(y), dtype=bool), n_classes=3,
                         settings=replace(settings, epochs=kept.best_epoch), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(refit.weights, every_row.weights))
    assert not torch.equal(refit.weights[0], kept.weights[0])


def test_the_saved_head_is_a_scikit_learn_classifier() -> None:
    x, y, split = problem(n_per_class=30, dim=20, classes=3, separation=0.8)
    names = np.array(["cat", "dog", "owl"])[y]
    head = clone(MLPHead(hidden=32, patience=5)).fit(x[split.train], names[split.train])
    assert head.get_params()["hidden"] == 32 and list(head.classes_) == ["cat", "dog", "owl"]
    assert head.coefs_[0].shape == (20, 32) and head.best_epoch_ <= head.n_epochs_
    assert np.mean(head.predict(x[split.test]) == names[split.test]) >= 0.8
    assert head.predict_proba(x[split.test]).shape == (len(split.test), 3)


def test_training_stopped_by_the_epoch_limit_is_not_converged(separable) -> None:
    store, _, _, split = separable
    result, model = train(store, split, params={"epochs": 2, "hidden": 16})
    assert not result.converged and model.named_steps["mlp"].n_epochs_ == 2


@pytest.mark.parametrize("option, message", [
    ("mlp.hidden=0", "mlp.hidden must be a whole number from 1 to 65536, not '0'"),
    ("mlp.dropout=1", "mlp.dropout must be a number from 0 to 0.95"),
    ("mlp.lr=-1", "mlp.lr must be a number from 1e-06 to 1"),
    ("mlp.epochs=2.5", "mlp.epochs must be a whole number"),
    ("mlp.depth=2", "mlp has no parameter 'depth' (its parameters: hidden, dropout, epochs"),
])
def test_mlp_parameters_out_of_range_are_one_clean_line(tmp_path, option, message) -> None:
    x, y, _ = problem(n_per_class=10, dim=8)
    array_store(tmp_path / "c", {"layer": x}, y)
    result = run_cli("svm", "--cache", str(tmp_path / "c"), "--probe", "mlp", "--probe-option", option,
                     cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_error(result, message)


def test_a_budget_too_small_for_the_mlp_says_which_would_work(tmp_path) -> None:
    x, y, split = problem(n_per_class=40, dim=3000, classes=3)
    store = array_store(tmp_path / "c", {"layer": x}, y, shard_size=64)
    result = run_cli("svm", "--cache", str(tmp_path / "c"), "--probe", "mlp", "--memory", "64M",
                     "--train-per-class", "20", "--device", "cpu", "--out", "out", cwd=tmp_path)
    assert_clean_error(result, "the mlp probe holds the 60 training rows of layer layer (3000 values a "
                       "row) and a head of 1024 hidden units")
    enough = re.search(r"--memory (\d+)M or more would work", result.stderr)
    assert enough and int(enough.group(1)) > 64
    # the budget it names is enough (a narrower head stays within 64M)
    stats, _ = train(store, split, memory=int(enough.group(1)) << 20,
                     params={"epochs": 1})
    assert stats.n_test == len(split.test)
    narrow, _ = train(store, split, memory=64 << 20, params={"hidden": 128, "epochs": 1})
    assert narrow.n_test == len(split.test)
    with pytest.raises(FeatxError, match="or more would work"):
        train(store, split, memory=(int(enough.group(1)) - 2) << 20,
              params={"epochs": 1})


def test_table_with_svm_and_mlp_writes_both_columns_plots_and_page(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    result = run_cli("table", str(demo_dir), "--model", "efficientnet_lite0", "--weights", "random",
                     "--layer", "pool", "--train-per-class", "12", "--probe", "svm,mlp", "--device", "cpu",
                     "--probe-option", "mlp.hidden=256", "--out", "out", "--html", "page.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[2]
    for column in ("svm Accuracy", "svm Balanced", "mlp Accuracy", "mlp Balanced", "svm Train Time",
                   "mlp Train Time", "svm C"):
        assert f"| {column} |" in header
    assert "mlp C" not in header
    assert "mlp, one hidden layer (ReLU, dropout)" in result.stdout and "hidden 256" in result.stdout
    report = json.loads((tmp_path / "out" / "table.json").read_text())
    assert report["probe_info"]["mlp"]["title"] == "MLP head" and not report["probe_info"]["mlp"]["chooses_C"]
    mlp = report["layers"][0]["other_probes"][0]
    assert mlp["probe"] == "mlp" and mlp["C"] is None and 0 <= mlp["accuracy"] <= 1
    assert (tmp_path / "out" / "accuracy.png").is_file() and (tmp_path / "out" / "pool.mlp.joblib").is_file()
    assert "mlp: accuracy" in (tmp_path / "page.html").read_text()


def test_two_ranks_score_with_one_head_as_one_process_does(tmp_path) -> None:
    """Under torchrun (gloo, on the CPU) every rank trains on all training rows, scores its part of
    the test rows with rank 0's head, and rank 0 writes what one process writes."""
    x, y, _ = problem(n_per_class=40, dim=64, classes=3, separation=0.3)
    array_store(tmp_path / "c", {"layer": x}, y)
    args = ["-m", "featx", "svm", "--cache", "c", "--probe", "mlp", "--probe-option", "mlp.hidden=64",
            "--train-per-class", "20", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same arithmetic
    try:
        one = run_cli(*args[2:], "--out", "one", cwd=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", *args, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert two.returncode == 0, two.stderr
    rows = [json.loads((tmp_path / out / "svm.json").read_text())["layers"][0] for out in ("one", "two")]
    one, two = (read_predictions(tmp_path / out, "layer") for out in ("one", "two"))
    assert one == two and len(two) == 60
    assert rows[0]["accuracy"] == rows[1]["accuracy"] > 0.6
