"""The real accuracy bar: efficientnet_lite0 ImageNet features on the shared 15-Scene copy."""

from __future__ import annotations

import pytest

from featx.study import ProbingOptions, run_table

from conftest import SHARED_DATA

SCENE = SHARED_DATA / "15scene"
SPLIT = SHARED_DATA / "15scene-split.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SCENE.is_dir() and SPLIT.is_file()),
                       reason=f"the 15-Scene dataset is not at {SCENE} (set FEATX_SHARED_DATA)"),
]


def test_pretrained_pool_layer_reaches_90_percent_and_random_weights_do_not(tmp_path) -> None:
    svm = ProbingOptions(split_file=str(SPLIT))
    pretrained, paths = run_table(SCENE, "efficientnet_lite0", cache=tmp_path / "cache",
                                  out_dir=tmp_path / "pretrained", probing=svm, progress=None)
    layers = {entry.layer: entry for entry in pretrained.layers}
    assert set(layers) == {"stage6_pool", "stage7_pool", "pool", "logits"}
    pool = layers["pool"]
    assert pool.dim == 1280 and pool.n_train == 1500 and pool.n_test == 2985
    assert pool.accuracy >= 0.90, pretrained
    assert paths["md"].is_file()

    random, _ = run_table(SCENE, "efficientnet_lite0", ["pool"], weights="random",
                          cache=tmp_path / "cache", out_dir=tmp_path / "random", probing=svm,
                          progress=None)
    assert random.weights_random
    assert random.layers[0].accuracy <= pool.accuracy - 0.20, random.layers[0]
