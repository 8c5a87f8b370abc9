"""Linear CKA between layers: against a direct computation, its known properties, and the
command that writes the matrix and heatmap the HTML report shows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from featx.errors import FeatxError
from featx.report.similarity import linear_cka, similarity

from conftest import array_store, assert_clean_error, run_cli


def direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC with centring matrices, as the formula is usually written."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = np.trace(k @ h @ l_ @ h)
    return hsic / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l_ @ h @ l_ @ h))


@pytest.fixture
def layers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(40, 7))
    return x, y, rng.normal(size=(40, 90))


def test_cka_equals_the_direct_formula_in_feature_and_gram_form(layers) -> None:
    x, y, wide = layers
    for a, b in ((x, y), (x, wide), (wide, y)):  # wide (90 > 40 rows) takes the Gram form
        assert linear_cka(a, b) == pytest.approx(direct_cka(a, b), rel=1e-9)


def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale(layers) -> None:
    x, y, wide = layers
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation = ortho_group.rvs(12, random_state=1)
    assert linear_cka(x @ rotation * 7.5, y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert linear_cka(x, 0.01 * y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    result = similarity({"x": x, "y": y, "wide": wide})
    assert np.allclose(result.matrix, result.matrix.T) and np.allclose(np.diag(result.matrix), 1)
    with pytest.raises(FeatxError, match="at least two layers"):
        similarity({"x": x})


def test_the_command_writes_matrix_and_heatmap_and_the_page_shows_it(tmp_path, demo_dir, demo_caches) -> None:
    demo_caches.copy_to(tmp_path, "random")
    args = ["--model", "efficientnet_lite0", "--weights", "random"]
    table = run_cli("table", str(demo_dir), *args, "--layer", "stage6_pool,pool,logits",
                    "--train-per-class", "12", "--C", "1", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    result = run_cli("similarity", "--layer", "stage6_pool,pool,logits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "featx-results" / "demo" / "efficientnet_lite0-random-seed0"
    rows = (out / "similarity.csv").read_text().splitlines()
    assert rows[0] == "layer,stage6_pool,pool,logits" and rows[2].split(",")[2] == "1.0000"
    assert (out / "similarity.png").stat().st_size > 1000
    page = run_cli("report", str(out), "--html", "page.html", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert "What the layers share (linear CKA)" in (tmp_path / "page.html").read_text()
    assert_clean_error(run_cli("similarity", "--layer", "pool", cwd=tmp_path), "at least two layers")
    assert_clean_error(run_cli("similarity", "--layer", "pool,head", cwd=tmp_path),
                       "layer 'head' is not in the cache")


def test_cka_streamed_from_a_cache_equals_cka_of_the_layers_read_whole(tmp_path) -> None:
    from featx.cache.store import FeatureStore
    from featx.study import layer_similarity

    rng = np.random.default_rng(3)
    base = rng.normal(size=(70, 30))
    layers = {"narrow": (base @ rng.normal(size=(30, 12))).astype(np.float32),
              "wide": np.tanh(base @ rng.normal(size=(30, 300))).astype(np.float32) + 1,
              "noise": rng.normal(size=(70, 40)).astype(np.float32)}
    store = array_store(tmp_path, layers, np.arange(70) % 3, shard_size=16, missing=(4, 41))
    kept = [i for i in range(70) if i not in (4, 41)]
    # 64 MB would hold everything; 200 KB holds a few rows of `wide` at a time (chunked passes)
    for memory in (64 << 20, 200_000):
        result = layer_similarity([FeatureStore(store.folder)], memory=memory)
        assert result.names == ["narrow", "wide", "noise"] and result.n_images == 68
        for i, a in enumerate(result.names):
            for j, b in enumerate(result.names):
                assert result.matrix[i, j] == pytest.approx(linear_cka(layers[a][kept], layers[b][kept]),
                                                            abs=1e-5)
