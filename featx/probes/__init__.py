"""Probes: what is trained on a cached layer and scored on the test images.

A probe is one module that registers itself: `register(Probe(name, title, summary, train, ...))`.
`train(stream, split, options)` streams the layer (featx.probes.stream) and returns a
`ProbeResult` and the fitted scikit-learn model (None where a probe has none to save). Every module
of this package is imported when the probes are first asked for, and so is every entry point of
the group `featx.probes` of an installed package; a registered probe is accepted by `--probe`,
listed by `featx probes`, and drawn in the tables, plots and HTML page like the built-in ones:

    svm     linear SVM (LinearSVC's objective), C by cross-validation
    logreg  multinomial logistic regression, L2, C by cross-validation
    knn     k nearest neighbours by cosine similarity, temperature-weighted votes
    mlp     one hidden layer (ReLU, dropout), AdamW, early stopping on held-out training rows
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points

import numpy as np

from featx.errors import FeatxError, OptionError
from featx.options import DEFAULT_MEMORY, Solver
from featx.probes.threads import check_threads

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """What one probe scored on one layer and one split, with which settings, in how long."""

    layer: str
    dim: int
    accuracy: float
    C: float | None  # None: a probe without C (knn)
    scaling: str
    train_seconds: float
    kernel_form: bool
    n_train: int
    n_test: int
    converged: bool
    probe: str = "svm"
    balanced_accuracy: float = float("nan")
    solver: str = ""  # the solver that fitted it (svm: torch or liblinear, as --solver or auto chose)
    cv_scores: dict[str, float] = field(default_factory=dict)
    C_edge: str = ""  # "top" or "bottom": cross-validation chose C at that end of the grid it searched
    y_true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # per test row
    y_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    test_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their dataset rows


@dataclass(frozen=True)
class ProbeOptions:
    """What every probe is given besides the layer and the split: `params` holds the values of the
    probe's own parameters (its `Probe.params`, defaults filled in); `threads` caps the threads a
    probe runs on (None: torch's own count; featx.probes.threads sizes them to the work)."""

    C: float | str = "auto"
    seed: int = 0
    solver: Solver = Solver.AUTO
    memory: int = DEFAULT_MEMORY
    params: Mapping[str, float] = field(default_factory=dict)
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", Solver.parse(self.solver, "solver"))
        object.__setattr__(self, "threads", check_threads(self.threads))


@dataclass(frozen=True)
class ProbeParam:
    """A numeric parameter of one probe (`--probe-option NAME.PARAM=VALUE`), with its range."""

    name: str
    default: float
    help: str
    low: float
    high: float
    whole: bool = False  # an integer, such as a width or a count

    def parse(self, probe: str, value: object) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not self.low <= number <= self.high or (self.whole and number != int(number)):
            kind = "a whole number" if self.whole else "a number"
            raise OptionError("probe_option", f"{probe}.{self.name} must be {kind} from {self.low:g} to "
                              f"{self.high:g}, not {value!r}")
        return int(number) if self.whole else number


TrainLayer = Callable[..., tuple[ProbeResult, object]]  # (stream, split, options) -> (result, model)


@dataclass(frozen=True)
class Probe:
    """A registered probe: what `--probe` names, what reports call it, and how it trains."""

    name: str
    title: str  # for figures and the page: "Linear SVM"
    summary: str  # one line for the table's notes: what it optimises
    train: TrainLayer
    chooses_C: bool = True  # whether it has a C, chosen by cross-validation or given
    params: tuple[ProbeParam, ...] = ()
    unconverged: str = "its solver stopped short of its tolerance, at its step limit or the float precision"

    def describe(self) -> dict[str, object]:
        """What a report keeps of the probe, so that it renders without the registry."""
        return {"title": self.title, "summary": self.summary, "chooses_C": self.chooses_C,
                "unconverged": self.unconverged}

    def defaults(self) -> dict[str, float]:
        return {param.name: param.default for param in self.params}


_PROBES: dict[str, Probe] = {}


def register(probe: Probe) -> Probe:
    """Make `probe` available everywhere by its name (a later registration of a name replaces it)."""
    if not probe.name.isidentifier():
        raise ValueError(f"a probe name must be an identifier, not {probe.name!r}")
    _PROBES[probe.name] = probe
    return probe


def registered() -> dict[str, Probe]:
    """Every probe, the built-in ones first imported (once) with the installed plugins."""
    _discover()
    return dict(_PROBES)


@cache
def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry in entry_points(group="featx.probes"):
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop featx
            log.warning("the probe plugin %s could not be loaded (%s: %s)", entry.name,
                        type(exc).__name__, exc)


def get_probe(name: str) -> Probe:
    """The registered probe of that name."""
    probes = registered()
    if name not in probes:
        raise FeatxError(f"unknown probe {name!r}; known probes: {', '.join(probes)}")
    return probes[name]


def parse_probes(text: str | Sequence[str]) -> tuple[str, ...]:
    """`svm,logreg` or a list of names -> the probes in the order given, each registered."""
    names = [n.strip() for item in ([text] if isinstance(text, str) else text) for n in item.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    known = registered()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise OptionError("probe", f"must be among {', '.join(known)} (comma-separated), not "
                          f"{', '.join(unknown) or repr(text)}")
    return tuple(names)


def parse_probe_params(given: Sequence[str] | Mapping[str, object], probes: Sequence[str],
                       ) -> dict[str, dict[str, float]]:
    """Each probe's parameters: its defaults, overridden by `PROBE.PARAM=VALUE` items (or a mapping
    of `PROBE.PARAM` to a value), each checked against the probe's parameters and their ranges."""
    values = {name: get_probe(name).defaults() for name in probes}
    items = given.items() if isinstance(given, Mapping) else [_split_item(item) for item in given]
    for key, value in items:
        probe, _, param = str(key).partition(".")
        if probe not in values:
            raise OptionError("probe_option", f"{key} is for the probe {probe!r}, which --probe does not "
                              f"name (it names {', '.join(probes)})")
        known = {p.name: p for p in get_probe(probe).params}
        if param not in known:
            offered = ", ".join(known) or "none"
            raise OptionError("probe_option", f"{probe} has no parameter {param!r} (its parameters: "
                              f"{offered})")
        values[probe][param] = known[param].parse(probe, value)
    return values


def _split_item(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise OptionError("probe_option", f"must be PROBE.PARAM=VALUE (such as knn.k=10), not {item!r}")
    return key.strip(), value.strip()


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in `y_true` (one counting pass, whatever
    the number of classes)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if not y_true.size:
        return float("nan")
    tested = np.bincount(y_true)
    hits = np.bincount(y_true[y_true == np.asarray(y_pred)], minlength=len(tested))
    present = tested > 0
    return float(np.mean(hits[present] / tested[present]))
