"""The real accuracy bar: efficientnet_lite0 ImageNet features on the shared 15-Scene copy, and the
README's results table as that command prints it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from featx.study import ProbingOptions, run_table

from conftest import SHARED_DATA, run_cli

SCENE = SHARED_DATA / "15scene"
SPLIT = SHARED_DATA / "15scene-split.csv"
README = Path(__file__).parents[1] / "README.md"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SCENE.is_dir() and SPLIT.is_file()),
                       reason=f"the 15-Scene dataset is not at {SCENE} (set FEATX_SHARED_DATA)"),
]


def _accuracy_rows(markdown: str) -> dict[str, list[float]]:
    """{layer: [every Accuracy and Balanced column]} from a table as `featx table` prints it."""
    header = next(line for line in markdown.splitlines() if line.startswith("| Layer |"))
    columns = [i for i, name in enumerate(header.split("|")) if "Accuracy" in name or "Balanced" in name]
    rows = {}
    for line in markdown.splitlines():
        cells = line.split("|")
        if len(cells) == len(header.split("|")) and re.fullmatch(r" \w+ ", cells[1]) and line != header:
            rows[cells[1].strip()] = [float(cells[i]) for i in columns]
    return rows


def test_the_readme_results_table_is_what_its_command_prints_and_beats_random_weights(tmp_path) -> None:
    """Accuracies within two test images (2/2985) of the README's: fp32 sums may round otherwise on
    another CPU, nothing more."""
    text = README.read_text()
    section = text.partition("## Results: 15-Scene")[2].partition("\n## ")[0]
    command = shlex.split(re.search(r"```bash\n(featx table 15scene/.*?)\n```", section).group(1))
    args = [str(SCENE) if a == "15scene/" else str(SPLIT) if a == "15scene-split.csv" else a
            for a in command[1:]]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed, documented = _accuracy_rows(result.stdout), _accuracy_rows(section)
    assert set(documented) == {"stage6_pool", "stage7_pool", "pool", "logits"}
    assert set(printed) == set(documented)
    for layer, values in documented.items():
        assert len(values) == 6
        assert printed[layer] == pytest.approx(values, abs=2 / 2985), (layer, result.stdout)
    assert min(documented["pool"][::2]) >= 0.88

    # the real bar: ImageNet features (the cache above) far above random weights' on pool
    svm = ProbingOptions(split_file=str(SPLIT))
    pretrained, paths = run_table(SCENE, "efficientnet_lite0", ["pool"], cache=tmp_path / "featx-cache",
                                  out_dir=tmp_path / "pretrained", probing=svm, progress=None)
    pool = pretrained.layers[0]
    assert pool.dim == 1280 and pool.n_train == 1500 and pool.n_test == 2985
    assert pool.accuracy >= 0.90, pretrained
    assert paths["md"].is_file()
    random, _ = run_table(SCENE, "efficientnet_lite0", ["pool"], weights="random",
                          cache=tmp_path / "featx-cache", out_dir=tmp_path / "random", probing=svm,
                          progress=None)
    assert random.weights_random
    assert random.layers[0].accuracy <= pool.accuracy - 0.20, random.layers[0]
