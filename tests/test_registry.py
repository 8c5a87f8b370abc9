"""The model registry: every torchvision classifier by name with its weight sets, layer tables
derived from the traced graph (shipped in the catalog), timm models, and weight sets that live
side by side in the cache."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from featx.models import catalog, get_model, load_model, model_names
from featx.models.layers import Layer
from featx.models.zoos import torchvision_zoo

from conftest import run_cli, write_images

CHECKED = ["vgg16", "vgg19_bn", "resnet50", "convnext_tiny", "vit_b_16", "mobilenet_v3_large",
           "swin_t", "densenet121", "efficientnet_lite1"]


def test_every_torchvision_classifier_is_registered_with_its_weights() -> None:
    names = set(model_names())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= names
    resnet = [w.tag for w in torchvision_zoo.weight_sets("resnet50")]
    assert resnet[0] == "IMAGENET1K_V1" and "IMAGENET1K_V2" in resnet
    assert get_model("resnet50", "IMAGENET1K_V2").preprocess.resize == 232
    assert get_model("resnet50", "resnet50.IMAGENET1K_V2").weights.tag == "IMAGENET1K_V2"


def test_the_shipped_catalog_is_what_the_graphs_give_now() -> None:
    for name in CHECKED:
        spec = get_model(name)
        if not catalog.ships(spec.zoo):
            pytest.skip(f"the catalog was made with another {spec.zoo.LIBRARY} than the installed one; "
                        "rebuild it with python -m featx.models.catalog")
        size = spec.preprocess.crop
        layers, defaults = spec.zoo.layer_table(name, spec.weights.tag, size)
        assert list(spec.layers) == layers, name
        assert list(spec.default_layers) == defaults, name
        assert catalog.weights_of(name, spec.zoo) == spec.zoo.weight_sets(name), name


def test_every_catalog_table_has_stages_a_vector_per_layer_and_logits() -> None:
    entries = json.loads(catalog.CATALOG.read_text())["models"]
    assert len(entries) >= 83
    for name, entry in entries.items():
        classifier = entry["source"] in ("torchvision", "lite")  # the others end with image features
        for table in entry["layers"].values():
            layers = [Layer.from_dict(layer) for layer in table["layers"]]
            names = [layer.name for layer in layers]
            assert len(set(names)) == len(names), name
            if classifier:
                assert names[-1] == "logits" and layers[-1].dim == 1000, name
            else:
                assert "pool" in names, name
            assert len(layers) >= 3 and set(table["defaults"]) <= set(names), name
            for layer in layers:
                if len(layer.shape) == 2:  # a token output becomes the class token or the token mean
                    assert layer.reduce in ("cls_token", "mean_tokens") and layer.dim == layer.shape[1]


def test_token_layers_are_reduced_never_flattened() -> None:
    spec = get_model("vit_b_16")
    cls = spec.layer("encoder_layer_11_cls")
    assert cls.shape == (197, 768) and cls.dim == 768 and cls.reduce == "cls_token"
    assert spec.layer("ln_mean").reduce == "mean_tokens"
    with pytest.raises(ValueError, match="never flattened"):
        Layer("bad", "encoder.ln", (197, 768), "flatten")
    swin = get_model("swin_t").layer("features.5_pool")
    assert swin.reduce == "avgpool_nhwc" and swin.dim == 384
    big = get_model("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")  # the weights' own input size
    assert big.preprocess.crop == 384 and big.layer("ln_cls").shape == (577, 768)


def test_layer_reductions_match_the_network_itself() -> None:
    """The class token after the final norm is what vit's head sees; swin's pool is its head's input."""
    vit = load_model("vit_b_32", "random")
    from featx.extract.forward import LayerExtractor

    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    out = LayerExtractor(vit, vit.spec.resolve_layers(["ln_cls", "ln_mean", "logits"]), "cpu",
                         precision="fp32")(x)
    with torch.no_grad():
        torch.testing.assert_close(vit.module.heads(out["ln_cls"]), out["logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["ln_cls"], out["ln_mean"])


def _check_architectures(monkeypatch, names: list[str]) -> int:
    """torchvision's own builder, given each weight set of each model, loads (strictly) the state
    dict of the architecture featx builds for it: same keys, same shapes (all on the meta device).
    Returns how many weight sets were checked."""
    import torchvision.models._api as api

    handed = {}
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda *a, **k: handed["state"])
    checked = 0
    for name in names:
        for weights in torchvision.models.get_model_weights(name):
            ours = torchvision_zoo.build(name, weights.name)
            source = ours.state_dict()
            if name in ("googlenet", "inception_v3"):  # their builder loads the auxiliary heads too
                with torch.device("meta"):
                    source = torchvision.models.get_model(name, weights=None, aux_logits=True,
                                                          init_weights=False).state_dict()
                assert set(ours.state_dict()) == {k for k in source if not k.startswith(("aux", "Aux"))}
            state = OrderedDict((k, torch.empty_like(v, device="meta")) for k, v in source.items())
            state._metadata = source._metadata  # noqa: SLF001 - block versions, as a saved file has
            handed["state"] = state
            with torch.device("meta"):
                torchvision.models.get_model(name, weights=weights)
            checked += 1
    return checked


def test_architecture_arguments_build_what_torchvision_builds_for_each_kind(monkeypatch) -> None:
    """A model of each kind of builder argument: two ImageNet sets (resnet50), SWAG's larger images
    (vit_b_16), auxiliary heads (googlenet), and three more families; every model: the slow test."""
    names = ["resnet50", "vit_b_16", "googlenet", "efficientnet_v2_s", "swin_t", "convnext_tiny"]
    assert _check_architectures(monkeypatch, names) == 9


@pytest.mark.slow
def test_architecture_arguments_build_what_torchvision_builds_for_every_weight_set(monkeypatch) -> None:
    names = [name for name in torchvision.models.list_models(module=torchvision.models)
             if not name.startswith("regnet")]  # regnet's builder computes widths with tensors: not on meta
    assert _check_architectures(monkeypatch, names) >= 80


@pytest.mark.parametrize("model, weights", [("timm:resnet18", "random"),
                                            ("timm:vit_tiny_patch16_224", "random")])
def test_timm_models_by_name_with_random_weights(model, weights) -> None:
    pytest.importorskip("timm")
    from featx.extract.forward import LayerExtractor

    spec = get_model(model, weights)
    loaded = load_model(model, weights)
    x = torch.randint(0, 256, (2, 3, spec.preprocess.crop, spec.preprocess.crop), dtype=torch.uint8)
    out = LayerExtractor(loaded, spec.layers, "cpu", precision="fp32")(x)
    for layer in spec.layers:
        assert out[layer.name].shape == (2, layer.dim), layer.name
    with torch.no_grad():
        from featx.data.preprocess import normalize

        pixels = normalize(spec.preprocess, x)
        logits = loaded.module(pixels)
        pre_logits = loaded.module.forward_head(loaded.module.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pool"], pre_logits, rtol=1e-4, atol=1e-4)  # what CLIP users probe
    assert "pool" in spec.default_layers


def test_timm_preprocessing_comes_from_the_pretrained_config() -> None:
    pytest.importorskip("timm")
    spec = get_model("timm:convnext_tiny.fb_in1k")
    assert spec.weights.tag == "fb_in1k" and spec.weights.name == "timm:convnext_tiny.fb_in1k"
    p = spec.preprocess
    assert (p.crop, p.resize, p.interpolation) == (224, 256, "bicubic")
    assert "stages.3_pool" in [layer.name for layer in spec.layers]


def test_timm_pretrained_weights_offline_give_one_clear_message(tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm")
    import socket

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no retries with backoff
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from featx.errors import FeatxError

    with pytest.raises(FeatxError, match="timm could not load the pretrained weights timm:resnet18.a1_in1k"):
        load_model("timm:resnet18.a1_in1k")


@pytest.mark.parametrize("model", ["convnext_tiny", "vit_b_16", "mobilenet_v3_large", "timm:resnet18"])
def test_layers_of_any_model_print_with_dimensions(tmp_path, model) -> None:
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    result = run_cli("layers", "--model", model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.removeprefix("*").split() for line in result.stdout.splitlines()[1:]]
    assert len(rows) >= 4 and all(int(row[1]) > 0 for row in rows)
    assert rows[-1][0] == "logits" and rows[-1][1] == "1000"


def test_timm_tables_are_derived_once_then_answered_without_torch(tmp_path) -> None:
    pytest.importorskip("timm")
    import os
    import subprocess
    import sys

    env = {**os.environ, "FEATX_HOME": str(tmp_path / "home")}
    code = ("import sys; from featx.models import get_model; s = get_model('timm:resnet18'); "
            "print(s.layer('layer4_pool').dim, 'timm' in sys.modules, 'torch' in sys.modules)")
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    env=env, check=False) for _ in range(2))
    assert first.returncode == 0 and first.stdout.split() == ["512", "True", "True"], first.stderr
    assert second.returncode == 0 and second.stdout.split() == ["512", "False", "False"], second.stderr
    assert list((tmp_path / "home").glob("catalog-featx*-timm-*.json"))


def test_models_lists_weight_sets(tmp_path) -> None:
    result = run_cli("models", "resnet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("resnet50 "))
    assert "IMAGENET1K_V1 (224px)" in line and "IMAGENET1K_V2 (224px)" in line


@pytest.mark.parametrize("model", [pytest.param("vit_b_16", marks=pytest.mark.slow), "mobilenet_v3_small"])
def test_table_runs_end_to_end_for_other_torchvision_models(tmp_path, model) -> None:
    write_images(tmp_path / "tiny", {"a": 4, "b": 4})
    result = run_cli("table", str(tmp_path / "tiny"), "--model", model, "--weights", "random",
                     "--train-per-class", "2", "--C", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = get_model(model)
    for name in spec.default_layers:
        assert f"| {name} |" in result.stdout
    table = json.loads((tmp_path / "featx-results" / "tiny" / f"{model}-random-seed0" / "table.json")
                       .read_text())
    assert [layer["dim"] for layer in table["layers"]] == [spec.layer(n).dim for n in spec.default_layers]


def _official_file(torch_home: Path, weights, seed: int) -> None:
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), folder / Path(weights.url).name)


def test_resnet50_v1_and_v2_caches_live_side_by_side_and_svm_finds_each(tmp_path, monkeypatch) -> None:
    for seed, weights in enumerate(torchvision.models.ResNet50_Weights):
        _official_file(tmp_path / "home", weights, seed)
    env = {"TORCH_HOME": str(tmp_path / "home")}
    write_images(tmp_path / "tiny", {"a": 4, "b": 4})
    for tag in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        result = run_cli("extract", str(tmp_path / "tiny"), "--model", "resnet50", "--weights", tag,
                         "--layer", "pool", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
    cache = tmp_path / "featx-cache" / "tiny"
    v1, v2 = (json.loads((cache / f"resnet50-{tag}" / "manifest.json").read_text())
              for tag in ("IMAGENET1K_V1", "IMAGENET1K_V2"))
    assert (v1["key"]["preprocess"]["resize"], v2["key"]["preprocess"]["resize"]) == (256, 232)
    assert v1["key"]["weights_checksum"] != v2["key"]["weights_checksum"]

    for query, folder in ((None, "resnet50-IMAGENET1K_V1"),  # left out: the weights imagenet names
                          ("IMAGENET1K_V2", "resnet50-IMAGENET1K_V2"),
                          ("resnet50.IMAGENET1K_V2", "resnet50-IMAGENET1K_V2"),
                          ("imagenet", "resnet50-IMAGENET1K_V1")):
        found = run_cli("svm", *(["--weights", query] if query else []), "--train-per-class", "2", "--C", "1",
                        cwd=tmp_path, env=env)
        assert found.returncode == 0, found.stderr
        assert f"tiny/{folder}" in json.loads(
            (tmp_path / "featx-results" / "tiny" / folder / "svm.json").read_text())["models"][0]["cache"]


def test_the_contributing_guide_toy_probe_registers_and_runs_beside_the_svm(tmp_path, demo_dir, demo_caches,
                                                                            monkeypatch) -> None:
    from featx import probes

    demo_caches.copy_to(tmp_path)
    guide = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    section = guide.split("## Adding a probe", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.setattr(probes, "_PROBES", dict(probes.registered()))  # the toy probe leaves with the test
    exec(compile(block, "CONTRIBUTING.md", "exec"), {"__name__": "centroid"})  # noqa: S102 - the guide's code
    assert probes.get_probe("centroid").title == "Nearest centre"
    listed = run_cli("probes", cwd=tmp_path)
    assert listed.returncode == 0 and "centroid" in listed.stdout
    result = run_cli("table", str(demo_dir), "--model", "efficientnet_lite0", "--layer", "pool",
                     "--probe", "svm,centroid", "--probe-option", "centroid.sharpness=0.5",
                     "--train-per-class", "12", "--C", "1", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (pool,) = json.loads(next((tmp_path / "out").rglob("table.json")).read_text())["layers"]
    scores = {pool["probe"]: pool["accuracy"]} | {o["probe"]: o["accuracy"] for o in pool["other_probes"]}
    assert scores.keys() == {"svm", "centroid"}
    assert scores["centroid"] > 0.5  # four classes: chance is 0.25
    assert "centroid Accuracy" in result.stdout and "(sharpness 0.5)" in result.stdout
    bad = run_cli("table", str(demo_dir), "--model", "efficientnet_lite0", "--probe", "centroid",
                  "--probe-option", "centroid.sharpness=2", cwd=tmp_path)
    assert bad.returncode == 2 and "sharpness" in bad.stderr
