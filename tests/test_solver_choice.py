"""`--solver auto` by the cost model, and the probes' thread policy: threads sized to the work,
never past the cores or the cap, the count restored after a probe, `--threads` checked."""

from __future__ import annotations

import json

import pytest
import torch

from featx.errors import OptionError
from featx.probes import ProbeOptions, costs, get_probe, linear, solvers, threads
from featx.probes.costs import SolveShape, faster_solver
from featx.probes.stream import LayerStream
from featx.study import ProbingOptions

from conftest import array_store, problem, run_cli

CV_AND_FINAL = 16  # 5 values of C x 3 folds, and the final fit


# --- the cost model -------------------------------------------------------------------------------


def test_a_tiny_problem_picks_liblinear() -> None:
    demo = SolveShape(rows=48, width=48, classes=4, problems=CV_AND_FINAL, kernel_form=True)
    assert costs.liblinear_seconds(demo, 2) < costs.torch_seconds(demo, 2)
    assert faster_solver(demo, 1) == faster_solver(demo, 2) == "liblinear"


@pytest.mark.parametrize("shape", [
    SolveShape(rows=1500, width=1500, classes=15, problems=CV_AND_FINAL, kernel_form=True),  # VGG16 relu7
    SolveShape(rows=10000, width=2048, classes=100, problems=CV_AND_FINAL, kernel_form=False),
], ids=["15-Scene kernel form", "100 classes x 10,000 rows"])
def test_a_large_problem_picks_torch(shape) -> None:
    assert costs.torch_seconds(shape, 2) < costs.liblinear_seconds(shape, 2)
    assert faster_solver(shape, 2) == "torch"


def test_the_gpu_and_ranks_keep_the_torch_solver() -> None:
    tiny = SolveShape(rows=48, width=48, classes=4, problems=CV_AND_FINAL, kernel_form=True, device="cuda:0")
    assert faster_solver(tiny, 2) == "torch"
    assert faster_solver(SolveShape(48, 48, 4, CV_AND_FINAL, True), 2, several_ranks=True) == "torch"


def test_the_work_grows_with_every_dimension_of_the_solve() -> None:
    base = SolveShape(rows=100, width=50, classes=4, problems=16, kernel_form=False)
    for bigger in (SolveShape(200, 50, 4, 16, False), SolveShape(100, 100, 4, 16, False),
                   SolveShape(100, 50, 8, 16, False), SolveShape(100, 50, 4, 32, False)):
        assert bigger.work > base.work
        assert costs.torch_seconds(bigger, 1) > costs.torch_seconds(base, 1)
        assert costs.liblinear_seconds(bigger, 1) > costs.liblinear_seconds(base, 1)
    assert SolveShape(100, 50, 2, 16, False).work * 4 == base.work  # two classes: one problem


def test_auto_names_the_solver_it_chose_in_the_notes_and_the_json(tmp_path, monkeypatch) -> None:
    x, y, _ = problem(n_per_class=20, dim=30, classes=3)
    array_store(tmp_path / "c", {"a": x}, y)
    args = ("svm", "--cache", str(tmp_path / "c"), "--train-per-class", "10", "--device", "cpu")
    small = run_cli(*args, "--out", "small", cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    assert json.loads((tmp_path / "small" / "svm.json").read_text())["layers"][0]["solver"] == "liblinear"
    notes = (tmp_path / "small" / "svm.md").read_text()
    assert "Solver (auto, the faster by featx's cost model per layer): svm: liblinear." in notes
    monkeypatch.setattr(costs, "LIBLINEAR_PER_FIT", 1e3)  # liblinear now costs more than any torch solve
    large = run_cli(*args, "--probe", "svm,logreg", "--out", "large", cwd=tmp_path)
    assert large.returncode == 0, large.stderr
    row = json.loads((tmp_path / "large" / "svm.json").read_text())["layers"][0]
    assert row["solver"] == "torch" and row["other_probes"][0]["solver"] == "torch"
    assert "svm: torch. logreg: torch." in (tmp_path / "large" / "svm.md").read_text()


def test_a_solver_asked_for_is_used_whatever_the_cost_model_says(tmp_path) -> None:
    x, y, split = problem(n_per_class=20, dim=30, classes=3)
    store = array_store(tmp_path, {"a": x}, y)
    for solver in ("torch", "liblinear"):
        result, _ = get_probe("svm").train(LayerStream(store, "a", device="cpu"), split,
                                           ProbeOptions(C=1.0, solver=solver))
        assert result.solver == solver


# --- threads ----------------------------------------------------------------------------------------


def test_threads_never_exceed_the_cores_or_the_cap(monkeypatch) -> None:
    cores = threads.available_cores()
    assert threads.threads_for(1e18, cores) == cores
    assert threads.threads_for(1e18, 1) == 1
    assert threads.threads_for(0.0, cores) == 1  # a tiny operation: one thread
    assert threads.thread_cap() <= cores and threads.thread_cap(1) == 1
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert threads.available_cores() == 1
    assert threads.thread_cap(4) == 1 and threads.threads_for(1e18, threads.thread_cap()) == 1
    with pytest.raises(OptionError, match="threads must be a whole number from 1 to 1 "):
        threads.check_threads(2)


def test_a_probe_takes_no_more_threads_than_the_cores_other_tasks_leave(monkeypatch) -> None:
    cores = threads.available_cores()
    monkeypatch.setattr(threads, "runnable_tasks", lambda: 1)  # this probe alone
    assert threads.thread_cap(cores) == cores
    monkeypatch.setattr(threads, "runnable_tasks", lambda: cores + 2)  # two busy processes beside it
    assert threads.thread_cap(cores) == threads.thread_cap() == 1
    monkeypatch.setattr(threads, "runnable_tasks", lambda: None)  # the system does not say
    assert threads.thread_cap(cores) == cores


def test_a_15_scene_sized_primal_layer_goes_to_liblinear_only_where_its_workers_find_cores() -> None:
    """1500 x 1280, 15 classes: liblinear's fits on two free cores beat the torch solver's one
    thread, liblinear on one core does not (benchmarks/README.md, contention.py)."""
    shape = SolveShape(rows=1500, width=1280, classes=15, problems=CV_AND_FINAL, kernel_form=False)
    assert faster_solver(shape, 2) == "liblinear" and faster_solver(shape, 1) == "torch"


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True, 10_000])
def test_a_thread_count_out_of_range_is_refused(value) -> None:
    with pytest.raises(OptionError, match=r"threads must be a whole number from 1 to \d+"):
        ProbingOptions(threads=value)
    assert ProbingOptions(threads=1).threads == 1 and ProbingOptions().threads is None


@pytest.mark.parametrize("command", ["svm", "table"])
def test_threads_out_of_range_on_the_command_line_is_one_line_exit_2(tmp_path, command) -> None:
    x, y, _ = problem(n_per_class=20, dim=30, classes=3)
    array_store(tmp_path / "c", {"a": x}, y)
    where = ["--cache", str(tmp_path / "c")] if command == "svm" else [str(tmp_path / "missing")]
    cores = threads.available_cores()
    result = run_cli(command, *where, "--threads", str(cores + 1), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"featx: error: --threads must be a whole number from 1 to {cores} (the cores this process may "
        f"use), not {cores + 1}"]


def test_a_small_probe_runs_on_one_thread_and_restores_the_count_after(tmp_path, monkeypatch) -> None:
    x, y, split = problem(n_per_class=20, dim=300, classes=3)
    store = array_store(tmp_path, {"a": x}, y)
    during = []
    real = solvers.fit_squared_hinge

    def spy(*args, **kwargs):
        during.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr("featx.probes.svm.fit_squared_hinge", spy)
    monkeypatch.setattr(threads, "runnable_tasks", lambda: 1)  # every core free: the work decides
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # as a caller may have it; the probe's work is worth one thread
    try:
        for probe in ("svm", "logreg", "knn"):
            get_probe(probe).train(LayerStream(store, "a", device="cpu"), split,
                                   ProbeOptions(solver="torch", threads=threads.available_cores()))
            assert torch.get_num_threads() == 2
        assert during and set(during) == {1}
    finally:
        torch.set_num_threads(previous)


def test_the_thread_count_is_restored_when_a_probe_fails(tmp_path, monkeypatch) -> None:
    x, y, split = problem(n_per_class=20, dim=300, classes=3)
    store = array_store(tmp_path, {"a": x}, y)

    def broken(*args, **kwargs):
        raise RuntimeError("the solver broke")

    monkeypatch.setattr("featx.probes.svm.fit_squared_hinge", broken)
    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="the solver broke"):
        get_probe("svm").train(LayerStream(store, "a", device="cpu"), split, ProbeOptions(solver="torch"))
    assert torch.get_num_threads() == previous


def test_liblinear_workers_follow_the_cap_not_the_machine(tmp_path, monkeypatch) -> None:
    import concurrent.futures

    made = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers, *args, **kwargs):
            made.append(workers)
            super().__init__(workers, *args, **kwargs)

    monkeypatch.setattr(linear, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(threads, "runnable_tasks", lambda: 1)  # every core free
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the machine's count is not the cores featx may use
    x, y, split = problem(n_per_class=20, dim=30, classes=3)
    store = array_store(tmp_path, {"a": x}, y)
    cap = threads.available_cores()
    get_probe("svm").train(LayerStream(store, "a", device="cpu"), split, ProbeOptions(solver="liblinear"))
    assert made == ([min(cap, torch.get_num_threads())] if min(cap, torch.get_num_threads()) > 1 else [])
    made.clear()
    get_probe("svm").train(LayerStream(store, "a", device="cpu"), split,
                           ProbeOptions(solver="liblinear", threads=1))
    assert made == []  # one worker: the fits run in turn, no pool
