"""Several ranks on one extraction (torchrun, gloo on the CPU): the same bytes as one process,
whole shards per rank, a killed rank's run finished by a rerun with another number of ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featx.cache.store import FeatureStore

from conftest import read_predictions, run_cli, write_images

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same arithmetic in every process, so bytes can match
EXTRACT = ["extract", "--weights", "random", "--device", "cpu", "--workers", "0", "--precision", "fp32"]


def torchrun(ranks: int, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
         "-m", "featx", *args], cwd=cwd, env={**os.environ, **ONE_THREAD},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`featx ARGS` in this process, on one thread like each rank."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(*args, cwd=cwd)
    finally:
        torch.set_num_threads(threads)


def store_in(cache: Path) -> FeatureStore:
    return FeatureStore(next(cache.rglob("manifest.json")).parent)


def features(cache: Path, layers: list[str]) -> dict[str, np.ndarray]:
    store = store_in(cache)
    return {name: store.read_layer(name).features for name in layers}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """48 images in 3 classes: 12 shards of 4."""
    return write_images(tmp_path_factory.mktemp("ranks") / "data", {"a": 16, "b": 16, "c": 16})


@pytest.fixture(scope="module")
def single(data) -> Path:
    """The set's pool and logits from one process: what every ranked run must equal."""
    root = data.parent / "single"
    root.mkdir()
    result = one_process(*EXTRACT, str(data), "--model", "resnet18", "--layer", "pool,logits",
                         "--batch-size", "2", "--shard-size", "4", "--cache", "c", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "c"


def test_a_killed_rank_leaves_whole_shards_and_a_rerun_with_other_ranks_finishes(tmp_path, data,
                                                                                 single) -> None:
    args = [*EXTRACT, str(data), "--model", "resnet18", "--layer", "pool,logits",
            "--batch-size", "2", "--shard-size", "4", "--cache", "c"]
    run = torchrun(2, *args, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not list(tmp_path.rglob("shard-*.h5")) and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    assert ranks, "torchrun started no ranks"
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    store = store_in(tmp_path / "c")
    assert store.missing_shards("pool"), "the run finished before the kill: nothing left to resume"
    for partial in tmp_path.rglob("*.tmp"):  # a shard the killed rank was writing: never taken as one
        shard = int(partial.name.split(".")[0].removeprefix("shard-"))
        assert shard in store.missing_shards(partial.parent.name), partial
    rerun = one_process(*args, cwd=tmp_path)  # one rank now
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.rglob("*.tmp"))  # the rerun wrote those shards whole
    ours, theirs = features(tmp_path / "c", ["pool", "logits"]), features(single, ["pool", "logits"])
    for name in ours:
        assert ours[name].tobytes() == theirs[name].tobytes(), name


def test_two_ranks_started_by_featx_write_what_one_process_writes_bit_for_bit(tmp_path, data, single) -> None:
    """The launcher behind `--gpus` (torch's elastic launch), with two CPU ranks."""
    code = ("import sys; from featx.extract.ranks import launch_local; "
            "sys.exit(launch_local(sys.argv[1:], 2))")
    result = subprocess.run(
        [sys.executable, "-c", code, *EXTRACT, str(data), "--model", "resnet18", "--layer", "pool,logits",
         "--batch-size", "2", "--shard-size", "4", "--cache", "c"],
        cwd=tmp_path, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stderr
    ours, theirs = features(tmp_path / "c", ["pool", "logits"]), features(single, ["pool", "logits"])
    for name in ours:
        assert ours[name].tobytes() == theirs[name].tobytes(), name
    runs = [run.to_dict() for run in store_in(tmp_path / "c").manifest.runs]
    assert sorted((r["rank"], r["ranks"], r["status"]) for r in runs) == [(0, 2, "done"), (1, 2, "done")]
    assert sum(r["images"] for r in runs) == store_in(single).n_images  # no image twice
    assert result.stderr.count("images, pool, logits in") == 1  # one summary line, from rank 0


def test_gpus_asks_for_gpus_this_machine_has(tmp_path, tiny_dataset) -> None:
    import torch

    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs or more")
    result = run_cli("extract", str(tiny_dataset), "--gpus", "64", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--gpus asks for 64 GPUs" in result.stderr
    result = run_cli("extract", str(tiny_dataset), "--gpus", "some", cwd=tmp_path)
    assert result.returncode == 2 and "--gpus must be all or a number" in result.stderr


CHOSEN = {"precision": "fp16", "dtype": "float16", "decode": "device", "tta": "flip", "verify": "hash",
          "max_pixels": "100000000"}


def test_the_ranks_get_every_option_given_to_featx_extract_gpus(tmp_path, monkeypatch) -> None:
    """Each option of `extract` but --gpus, given a value other than its default, reaches the
    ranks' command line with that value (an option added later is passed on too)."""
    import typing

    import typer

    from featx.cli import app as cli
    from featx.extract import ranks

    command = typer.main.get_command(cli.app).commands["extract"]
    hints = typing.get_type_hints(cli.extract)
    given = ["data-folder"]
    for param in command.params:
        if param.param_type_name == "option" and param.name not in ("gpus", "help", "device"):
            if getattr(param, "is_flag", False):
                given.append(param.secondary_opts[0] if param.default else param.opts[0])
            else:
                hint = hints[param.name]
                value = "7" if int in (typing.get_args(hint) or [hint]) else f"given-{param.name}"
                value = CHOSEN.get(param.name, value)  # choices are checked before the ranks start
                given += [param.opts[0], value]
    launched: list[tuple[list[str], int]] = []
    monkeypatch.setattr(cli, "_gpu_count", lambda gpus: 2)
    monkeypatch.setattr(ranks, "launch_local", lambda args, count: launched.append((args, count)) or 0)
    result = run_cli("extract", *given, "--device", "cpu", "--gpus", "all", cwd=tmp_path)
    assert result.returncode == 2 and "--device is cpu, but --gpus all puts each rank" in result.stderr
    given += ["--device", "cuda"]
    result = run_cli("extract", *given, "--gpus", "all", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [(args, count)] = launched
    assert args[0] == "extract" and count == 2 and "--gpus" not in args
    expected = command.make_context("extract", list(given), resilient_parsing=True).params
    assert command.make_context("extract", args[1:], resilient_parsing=True).params == expected
    assert len(given) > 20 and expected["layer"] == ["given-layer"]


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory) -> Path:
    """A layer wider than its training rows (kernel form), too large to hold in 64M (streamed,
    Gram matrix in chunks), and a narrow one (primal form)."""
    from conftest import array_store

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 500)
    centres = rng.normal(size=(4, 6000)).astype(np.float32)
    wide = centres[labels] * 0.05 + rng.normal(size=(len(labels), 6000)).astype(np.float32)
    narrow = wide[:, :64].copy()
    root = tmp_path_factory.mktemp("wide")
    array_store(root / "c", {"wide": wide, "narrow": narrow}, labels, shard_size=256)
    return root / "c"


def _probe_results(folder: Path) -> dict:
    import json

    table = json.loads((folder / "svm.json").read_text())
    scores = {}
    for row in table["layers"]:
        predictions = read_predictions(folder, row["layer"])
        for score in (row, *row["other_probes"]):
            scores[(row["layer"], score["probe"])] = (score["accuracy"], score["C"],
                                                      [p[score["probe"]] for p in predictions])
    return scores


def test_two_ranks_probe_as_one_process_does(tmp_path, wide_cache) -> None:
    args = ["svm", "--cache", str(wide_cache), "--probe", "svm,logreg,knn", "--memory", "64M",
            "--train-per-class", "250", "--device", "cpu"]
    single = one_process(*args, "--out", "one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    run = torchrun(2, *args, "--out", "two", cwd=tmp_path)
    out, err = run.communicate(timeout=900)
    assert run.returncode == 0, err
    assert out.count("| wide |") == 1  # one table, from rank 0
    one, two = _probe_results(tmp_path / "one"), _probe_results(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for key, (accuracy, C, predicted) in one.items():
        assert two[key][1] == C, key
        assert abs(two[key][0] - accuracy) <= 1 / 1000, key  # at most one of 1000 test images
        if predicted is not None:
            assert np.mean(np.array(predicted) != np.array(two[key][2])) <= 1 / 1000, key


SPLIT_BUDGET = 6_500_000  # bytes: 1500 training rows of 600 values (3.6 MB) do not fit half; 750 do


def _mid_cache(root: Path) -> Path:
    """A layer narrower than its training rows (primal form) whose rows exceed SPLIT_BUDGET / 2."""
    from conftest import array_store

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 750)
    centres = rng.normal(size=(4, 600)).astype(np.float32)
    mid = centres[labels] * 0.1 + rng.normal(size=(3000, 600)).astype(np.float32)
    array_store(root, {"mid": mid}, labels, shard_size=256)
    return root


def _probes(stream, budget: int) -> dict:
    """svm and logreg (C fixed: the solve's own memory stays small) on every other row."""
    from featx.data.splits import Split
    from featx.probes import ProbeOptions, get_probe

    rows = np.arange(len(stream.index))
    split = Split(rows[::2], rows[1::2], "every other row")
    out = {}
    for probe in ("svm", "logreg"):
        result, _ = get_probe(probe).train(stream, split, ProbeOptions(C=1.0, memory=budget))
        training = next(iter(stream.memo.values()))
        out[probe] = (result.accuracy, result.y_pred.tolist(), len(training.x))
    return out


def _solve_in_part(rank: int, world: int, port: int, problems: dict, cache: Path, out: Path) -> None:
    """One rank: every problem on its part of the rows, sums over the ranks; and the probes on a
    layer whose training rows do not fit one rank's budget."""
    import torch

    from featx.probes.solvers import fit_logistic, fit_squared_hinge
    from featx.probes.stream import LayerStream

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    stream = LayerStream(store_in(cache), "mid", device="cpu")  # joins the process group
    part = stream.ranks.part(len(next(iter(problems.values()))[0]))
    fits = {}
    for name, (x, y, masks, C, classes) in problems.items():
        fit = (fit_squared_hinge if name.startswith("hinge") else fit_logistic)(
            x[part], y[part], masks[:, part], C=C, n_classes=classes, total=stream.ranks.sum)
        fits[name] = (fit.coef, fit.intercept, fit.objective, fit.converged)
    fits["probes"] = _probes(stream, SPLIT_BUDGET)
    torch.save(fits, out / f"rank{rank}.pt")
    stream.ranks.leave()


def test_a_solve_split_between_ranks_equals_the_whole_solve(tmp_path) -> None:
    """The torch solvers with each rank holding half of the rows and the sums all-reduced: the
    weights and objectives of the solve on all rows, the same on both ranks. The probes split
    training rows that one rank's budget cannot hold, and score as one process does with room."""
    import socket

    import torch
    import torch.multiprocessing as mp

    from featx.errors import FeatxError
    from featx.probes.solvers import fit_logistic, fit_squared_hinge
    from featx.probes.stream import LayerStream

    rng = np.random.default_rng(1)
    problems = {}
    for classes in (2, 4):
        y = rng.integers(0, classes, 301)
        x = (rng.normal(size=(classes, 20))[y] + rng.normal(size=(301, 20)) * 1.5).astype(np.float32)
        folds = rng.integers(0, 3, 301)
        masks = np.stack([folds != k for k in range(3)] * 2 + [np.ones(301, bool)])
        C = np.array([0.1] * 3 + [10.0] * 3 + [1.0])  # a path of growing C per mask, with helpers
        for loss in ("hinge", "logistic"):
            problems[f"{loss}-{classes}"] = (torch.tensor(x), torch.tensor(y), torch.tensor(masks),
                                             torch.tensor(C), classes)
    cache = _mid_cache(tmp_path / "c")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_solve_in_part, args=(2, port, problems, cache, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (x, y, masks, C, classes) in problems.items():
        fit = fit_squared_hinge if name.startswith("hinge") else fit_logistic
        whole = fit(x, y, masks, C=C, n_classes=classes)
        for coef, intercept, objective, converged in (r[name] for r in ranks):
            assert converged.all() and whole.converged.all(), name
            torch.testing.assert_close(objective, whole.objective, rtol=1e-5, atol=0)  # float32 sums
            # weights to the precision of a solve to tol=1e-6 in float32 (a single process given
            # the rows in another order moves them by up to 1e-3 of their scale, too)
            scale = float(whole.coef.abs().max())
            assert float((coef - whole.coef).abs().max()) <= 3e-3 * scale, name
            assert float((intercept - whole.intercept).abs().max()) <= 3e-3 * scale, name
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][name], ranks[1][name])), name
    alone = _probes(LayerStream(store_in(cache), "mid", device="cpu"), 64 << 20)
    for probe, (accuracy, predicted, held) in alone.items():
        assert held == 1500
        for rank in ranks:
            two_accuracy, two_predicted, two_held = rank["probes"][probe]
            assert two_held == 750, probe  # half of the training rows on each rank
            assert abs(two_accuracy - accuracy) <= 1 / 1500, probe
            assert np.mean(np.array(predicted) != np.array(two_predicted)) <= 1 / 1500, probe
    with pytest.raises(FeatxError, match="the training rows of layer mid .* do not fit the memory budget"):
        _probes(LayerStream(store_in(cache), "mid", device="cpu"), SPLIT_BUDGET)  # one process


@pytest.mark.parametrize("sizes", [{"a": 8, "b": 4, "c": 2}, {"a": 8, "b": 6}])
def test_every_shard_of_every_layer_has_one_rank(sizes) -> None:
    """Shards go with the unit (of the largest shard size) of their first image; where the sizes
    divide each other, as the cache plans them, no image is needed by two ranks."""
    from featx.extract.ranks import Ranks
    from featx.extract.run import rank_shards

    images = 50
    missing = {name: [k for k in range(-(-images // size)) if k % 3 != 1 or name == "a"]
               for name, size in sizes.items()}  # some shards written already
    for world in (1, 2, 3):
        shares = [rank_shards(missing, sizes, Ranks(rank, world)) for rank in range(world)]
        for name, shards in missing.items():
            owners = [k for share in shares for k in share[name]]
            assert sorted(owners) == shards, (name, world)  # each missing shard once, nothing else
        needed = [{i for name, share in s.items() for k in share
                   for i in range(k * sizes[name], min((k + 1) * sizes[name], images))} for s in shares]
        if all(max(sizes.values()) % size == 0 for size in sizes.values()):
            assert sum(len(n) for n in needed) == len(set().union(*needed)), world  # no image twice
        if world == 2:
            assert min(len(n) for n in needed) >= 16  # both ranks have work


def test_wide_layers_get_shard_sizes_that_divide_the_others(tmp_path, tiny_dataset) -> None:
    from featx.cache.store import SHARD_BYTES, FeatureStore
    from featx.models import Layer

    store = FeatureStore.for_arrays(tmp_path / "c", "arrays", np.zeros(4, np.int64), classes=("a",),
                                    layers={"x": 4},
                                    shard_size=512)
    wide = SHARD_BYTES // 4 // 300  # 300 rows of it fill a shard
    store.plan_layers([Layer("w", "w", (wide,)), Layer("n", "n", (10,)),
                       Layer("huge", "huge", (SHARD_BYTES,))], batch_size=32, shard_size=512)
    planned = {name: store.manifest.layers[name].shard_size for name in ("w", "n", "huge")}
    assert planned == {"w": 256, "n": 512, "huge": 32}
    store.plan_layers([Layer("odd", "odd", (wide,))], batch_size=32, shard_size=480)  # 480/64 is not whole
    assert store.manifest.layers["odd"].shard_size == 288  # as near 300 as batches of 32 allow
