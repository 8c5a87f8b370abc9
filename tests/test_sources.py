"""The open_clip and Hugging Face model sources: tiny models built from small configs with random
weights; features equal to each library's own forward on the same batch; weights written by each
library's own save function and read through its cache layout or from --weights PATH; the
preprocessing each checkpoint pairs with its weights; clear one-line errors offline; layer tables
of the shipped checkpoints without a download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from featx.data.preprocess import normalize, prepare
from featx.errors import FeatxError
from featx.extract.forward import LayerExtractor
from featx.models import catalog, get_model, load_model
from featx.models.weights import Preprocess, file_checksum, state_dict_checksum

from conftest import assert_clean_error, run_cli, write_images

TINY_TEXT = {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}
TINY_OPENCLIP = {
    "featx-tiny-vit": {"embed_dim": 16, "text_cfg": TINY_TEXT, "vision_cfg": {
        "image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}},
    "featx-tiny-rn": {"embed_dim": 16, "text_cfg": TINY_TEXT, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}},
}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def assert_same(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding, relative to the largest value."""
    assert ours.shape == reference.shape, name
    assert (ours - reference).abs().max().item() <= 1e-5 * reference.abs().max().item() + 1e-6, name


def _extract(loaded, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every (or the named) layer of two random images, and the normalised batch they were."""
    layers = loaded.spec.resolve_layers(names) if names else list(loaded.spec.layers)
    images = _images(2, loaded.preprocess.crop)
    out = LayerExtractor(loaded, layers, "cpu", precision="fp32")(images)
    return out, normalize(loaded.preprocess, images)


def hub_snapshot(hub: Path, repo: str) -> Path:
    """A repository's snapshot folder in a Hugging Face cache, its main revision pointing at it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache and no network: nothing can be downloaded."""
    constants = pytest.importorskip("huggingface_hub.constants")
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture
def open_clip(monkeypatch):
    """open_clip with two tiny architectures, each with a pretrained tag `tiny` on the hub: the
    ViT's trained with QuickGELU (OpenAI's defaults), the ResNet's squashed (SigLIP's defaults)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory, pretrained

    for arch, config in TINY_OPENCLIP.items():
        monkeypatch.setitem(factory._MODEL_CONFIGS, arch, config)
    monkeypatch.setitem(pretrained._PRETRAINED, "featx-tiny-vit",
                        {"tiny": pretrained._pcfg(hf_hub="featx-test/tiny-vit/", quick_gelu=True)})
    monkeypatch.setitem(pretrained._PRETRAINED, "featx-tiny-rn",
                        {"tiny": pretrained._slpcfg(hf_hub="featx-test/tiny-rn/")})
    return open_clip


@pytest.fixture
def transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


# --- open_clip ---------------------------------------------------------------------------------

def _captured(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The outputs of these modules in the next forward pass (for the reference only)."""
    outputs: list[torch.Tensor] = []
    for module in modules:
        module.register_forward_hook(lambda _m, _i, output: outputs.append(output))
    return outputs


def test_openclip_vit_layers_equal_open_clips_own_computation(open_clip) -> None:
    loaded = load_model("openclip:featx-tiny-vit", "random", seed=1)
    assert [layer.name for layer in loaded.spec.layers] == [
        "block0_cls", "block0_mean", "block1_cls", "block1_mean", "pool", "embed"]
    reference = open_clip.create_model("featx-tiny-vit").eval()
    reference.visual.load_state_dict(loaded.module.state_dict())
    ours, x = _extract(loaded)
    blocks = _captured(list(reference.visual.transformer.resblocks))
    with torch.no_grad():
        embed = reference.encode_image(x)
        proj, reference.visual.proj = reference.visual.proj, None
        pooled = reference.visual(x)  # the image feature before the projection
    assert_same(ours["embed"], embed, "embed")
    assert_same(ours["pool"], pooled, "pool")
    torch.testing.assert_close(ours["pool"] @ proj.detach(), ours["embed"])
    for i, block in enumerate(blocks[:2]):
        assert_same(ours[f"block{i}_cls"], block[:, 0], f"block{i}_cls")
        assert_same(ours[f"block{i}_mean"], block[:, 1:].mean(dim=1), f"block{i}_mean")


def test_openclip_resnet_stages_and_embedding_equal_open_clips_own_computation(open_clip) -> None:
    loaded = load_model("openclip:featx-tiny-rn", "random", seed=2)
    assert loaded.spec.default_layers == ("layer3_pool", "layer4_pool", "embed")
    reference = open_clip.create_model("featx-tiny-rn").eval()
    reference.visual.load_state_dict(loaded.module.state_dict())
    ours, x = _extract(loaded)
    stages = _captured([getattr(reference.visual, f"layer{k}") for k in range(1, 5)])
    with torch.no_grad():
        embed = reference.encode_image(x)
    assert_same(ours["embed"], embed, "embed")
    for k, stage in enumerate(stages, start=1):
        assert_same(ours[f"layer{k}"], stage.flatten(1), f"layer{k}")
        assert_same(ours[f"layer{k}_pool"], stage.mean(dim=(2, 3)), f"layer{k}_pool")


def test_openclip_tag_weights_come_from_the_hugging_face_cache(open_clip, offline_hub) -> None:
    torch.manual_seed(3)
    reference = open_clip.create_model("featx-tiny-vit", force_quick_gelu=True).eval()  # as the tag trained
    checkpoint = hub_snapshot(offline_hub, "featx-test/tiny-vit") / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), checkpoint)

    loaded = load_model("openclip:featx-tiny-vit/tiny")
    assert loaded.weights.name == "openclip:featx-tiny-vit.tiny" and loaded.weights.source == "openclip"
    assert loaded.weights.checksum == file_checksum(checkpoint)[:16]
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in loaded.module.modules())
    ours, x = _extract(loaded, ["pool", "embed"])
    with torch.no_grad():
        assert_same(ours["embed"], reference.encode_image(x), "embed")
    assert not any(key.startswith(("transformer.", "token_embedding")) for key in loaded.module.state_dict()
                   if not key.startswith("transformer.resblocks"))  # the image tower only


def test_openclip_weights_path_reads_a_checkpoint_with_the_tags_preprocessing(open_clip, tmp_path) -> None:
    torch.manual_seed(4)
    reference = open_clip.create_model("featx-tiny-rn").eval()
    path = tmp_path / "my-clip.bin"
    torch.save({"state_dict": reference.state_dict()}, path)

    loaded = load_model("openclip:featx-tiny-rn/tiny", str(path))
    assert loaded.weights.source == "file" and loaded.weights.tag == f"local-{file_checksum(path)[:12]}"
    assert loaded.preprocess == get_model("openclip:featx-tiny-rn/tiny").preprocess
    assert loaded.preprocess.resize_mode == "squash" and loaded.preprocess.mean == (0.5, 0.5, 0.5)
    ours, x = _extract(loaded, ["embed"])
    with torch.no_grad():
        assert_same(ours["embed"], reference.encode_image(x), "embed")

    dataset = write_images(tmp_path / "images", {"a": 2, "b": 2}, size=80)
    result = run_cli("extract", str(dataset), "--model", "openclip:featx-tiny-rn/tiny", "--weights",
                     str(path), "--layer", "embed", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "featx-cache").glob(f"*/openclip-featx-tiny-rn-{loaded.weights.tag}"))


@pytest.mark.parametrize("name", ["openclip:ViT-B-32/laion2b_s34b_b79k", "openclip:ViT-B-16-SigLIP/webli"])
def test_openclip_preprocessing_is_what_open_clip_pairs_with_the_tag(name) -> None:
    open_clip = pytest.importorskip("open_clip")
    arch, tag = name.removeprefix("openclip:").split("/")
    spec = get_model(name)  # derived from open_clip's own config: nothing downloaded
    pretrained = open_clip.get_pretrained_cfg(arch, tag)
    assert spec.weights.tag == tag and spec.weights.location == f"hf-hub:{pretrained['hf_hub']}"
    assert spec.layer("embed").dim == open_clip.get_model_config(arch)["embed_dim"]
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=224), pretrained))
    transform = image_transform_v2(cfg, is_train=False)
    image = TF.to_pil_image(_images(1, 300)[0][:, :, :200])  # 200 wide, 300 high: resize modes differ
    theirs = transform(image)
    ours = normalize(spec.preprocess, prepare(spec.preprocess, image)[None])[0]
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-6  # the same PIL resize and crop


def test_openclip_missing_weights_offline_are_one_clean_line(open_clip, offline_hub, tmp_path) -> None:
    dataset = write_images(tmp_path / "images", {"a": 2, "b": 2})
    result = run_cli("extract", str(dataset), "--model", "openclip:featx-tiny-vit/tiny", "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_error(result, "openclip:featx-tiny-vit.tiny", "hf-hub:featx-test/tiny-vit", "--weights PATH")


# --- Hugging Face ------------------------------------------------------------------------------

def _dinov2(transformers, folder: Path, seed: int, *, registers: bool = False):
    """A tiny DINOv2 (with register tokens) saved with its image processor as save_pretrained does."""
    torch.manual_seed(seed)
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
        layerscale_value=0.5)
    model = getattr(transformers, f"{kind}Model")(config).eval()
    model.save_pretrained(folder)
    crop = {"height": 28, "width": 28}
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(folder)
    return model


@pytest.mark.parametrize("registers", [False, True])
def test_hf_dinov2_layers_equal_the_library_forward(transformers, tmp_path, registers) -> None:
    reference = _dinov2(transformers, tmp_path / "dinov2", seed=5, registers=registers)
    loaded = load_model("hf:featx-test/tiny-dinov2", str(tmp_path / "dinov2"))
    prefix = 5 if registers else 1  # the class token and the 4 register tokens
    assert loaded.spec.layer("block0_mean").prefix_tokens == prefix
    p = loaded.preprocess
    assert (p.resize, p.crop, p.interpolation) == (32, 28, "bicubic")
    ours, x = _extract(loaded)
    with torch.no_grad():
        out = reference(pixel_values=x, output_hidden_states=True)
    last = out.last_hidden_state
    assert_same(ours["pool"], out.pooler_output, "pool")
    assert_same(ours["cls+mean"], torch.cat([last[:, 0], last[:, prefix:].mean(dim=1)], dim=1), "cls+mean")
    for i in range(2):
        hidden = out.hidden_states[i + 1]
        assert_same(ours[f"block{i}_cls"], hidden[:, 0], f"block{i}_cls")
        assert_same(ours[f"block{i}_mean"], hidden[:, prefix:].mean(dim=1), f"block{i}_mean")


def test_hf_forward_pass_stops_at_the_deepest_requested_block(transformers, tmp_path) -> None:
    _dinov2(transformers, tmp_path / "dinov2", seed=6)
    loaded = load_model("hf:featx-test/tiny-dinov2", str(tmp_path / "dinov2"))
    extractor = LayerExtractor(loaded, loaded.spec.resolve_layers(["block0_cls"]), "cpu")
    modules = {name for name, _ in extractor.graph.named_modules()}
    assert "encoder.layer.0" in modules and "encoder.layer.1" not in modules and "layernorm" not in modules


def _clip_like(transformers, kind: str, folder: Path, seed: int):
    """A tiny CLIP or SigLIP (text and vision towers) saved with its image processor."""
    torch.manual_seed(seed)
    text = {**SMALL, "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {**SMALL, "image_size": 32, "patch_size": 8}
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = transformers.CLIPModel(config).eval()
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32})
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config).eval()
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_clip_and_siglip_vision_towers_equal_the_library_forward(transformers, tmp_path, kind) -> None:
    reference = _clip_like(transformers, kind, tmp_path / kind, seed=7)
    loaded = load_model(f"hf:featx-test/tiny-{kind}", str(tmp_path / kind))
    assert not any(key.startswith("text_model") for key in loaded.module.state_dict())  # no text tower
    ours, x = _extract(loaded)
    with torch.no_grad():
        vision = reference.vision_model(pixel_values=x, output_hidden_states=True)
        image = reference.get_image_features(pixel_values=x).pooler_output  # CLIP: projected; SigLIP: pooled
    prefix = 1 if kind == "clip" else 0
    for i in range(2):
        assert_same(ours[f"block{i}_mean"], vision.hidden_states[i + 1][:, prefix:].mean(dim=1), f"block{i}")
    assert_same(ours["pool"], vision.pooler_output, "pool")
    if kind == "clip":
        assert_same(ours["block1_cls"], vision.last_hidden_state[:, 0], "block1_cls")
        assert_same(ours["embed"], image, "embed")
        assert loaded.preprocess.resize_mode == "shortest"
    else:
        assert "block1_cls" not in {layer.name for layer in loaded.spec.layers}  # SigLIP has no class token
        assert_same(ours["pool"], image, "image features")
        assert loaded.preprocess.resize_mode == "squash"


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_hf_vit_and_convnext_layers_equal_the_library_forward(transformers, tmp_path, kind) -> None:
    torch.manual_seed(8)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=32, patch_size=8),
                                      add_pooling_layer=False)
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
        model = transformers.ConvNextModel(config)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 56}, crop_pct=0.875)
    model.eval().save_pretrained(tmp_path / kind)
    processor.save_pretrained(tmp_path / kind)
    loaded = load_model(f"hf:featx-test/tiny-{kind}", str(tmp_path / kind))
    ours, x = _extract(loaded)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    if kind == "vit":
        assert_same(ours["pool"], out.last_hidden_state[:, 0], "pool")
        assert_same(ours["block1_cls"], out.hidden_states[2][:, 0], "block1_cls")
    else:
        assert (loaded.preprocess.resize, loaded.preprocess.crop) == (64, 56)  # shortest_edge / crop_pct
        assert_same(ours["pool"], out.pooler_output, "pool")
        for i in range(4):
            assert_same(ours[f"stage{i}_pool"], out.hidden_states[i + 1].mean(dim=(2, 3)), f"stage{i}_pool")


def test_hf_checkpoint_from_the_hugging_face_cache(transformers, offline_hub, tmp_path) -> None:
    reference = _dinov2(transformers, hub_snapshot(offline_hub, "featx-test/cached-dinov2"), seed=9)
    loaded = load_model("hf:featx-test/cached-dinov2")
    assert loaded.weights.name == "hf:featx-test/cached-dinov2.main" and loaded.weights.source == "hf"
    assert loaded.weights.checksum == state_dict_checksum(reference.state_dict())[:16]
    ours, x = _extract(loaded, ["pool"])
    with torch.no_grad():
        assert_same(ours["pool"], reference(pixel_values=x).pooler_output, "pool")
    result = run_cli("layers", "--model", "hf:featx-test/cached-dinov2", cwd=tmp_path)  # its config is local
    assert result.returncode == 0, result.stderr
    assert "cls+mean" in result.stdout and "resize 32 (bicubic), crop 28" in result.stdout


def test_hf_weights_are_built_with_the_checkpoints_own_config(transformers, offline_hub, monkeypatch) -> None:
    """The config featx ships for a checkpoint answers `featx layers`; its weights are loaded with
    the checkpoint's own config, which comes with them (here: a tiny model under that name)."""
    snapshot = hub_snapshot(offline_hub, "facebook/dinov2-small")
    reference = _dinov2(transformers, snapshot, seed=13)
    own = transformers.AutoConfig.from_pretrained(snapshot)
    (snapshot / "config.json").unlink()  # not in the cache until the weights are downloaded
    cached = transformers.AutoConfig.from_pretrained

    def download(repo, *args, local_files_only=False, **kwargs):
        if repo == "facebook/dinov2-small" and not local_files_only:
            own.save_pretrained(snapshot)  # what a download leaves in the cache
        return cached(repo, *args, local_files_only=local_files_only, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", download)
    assert get_model("hf:facebook/dinov2-small").layer("pool").dim == 384  # the shipped table
    loaded = load_model("hf:facebook/dinov2-small")
    state = reference.state_dict()
    assert loaded.module.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.module.state_dict().items())


def test_hf_local_checkpoint_is_named_by_its_content_and_extracts_end_to_end(transformers, tmp_path) -> None:
    _dinov2(transformers, tmp_path / "a", seed=10)
    _dinov2(transformers, tmp_path / "b", seed=11)
    a, b = (get_model("hf:featx-test/tiny-dinov2", str(tmp_path / f)).weights for f in "ab")
    assert a.tag.startswith("local-") and a.tag != b.tag and a.location == str((tmp_path / "a").resolve())
    dataset = write_images(tmp_path / "images", {"a": 3, "b": 3}, size=48)
    result = run_cli("extract", str(dataset), "--model", "hf:featx-test/tiny-dinov2", "--weights",
                     str(tmp_path / "a"), "--layer", "pool", "--layer", "cls+mean", "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder, = (tmp_path / "featx-cache").glob(f"*/hf-featx-test-tiny-dinov2-{a.tag}")
    assert (folder / "cls+mean").is_dir() and (folder / "pool").is_dir()


def test_hf_checkpoint_folders_that_featx_cannot_use_are_clear_errors(transformers, tmp_path) -> None:
    torch.manual_seed(12)
    vision = transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModel(vision).save_pretrained(tmp_path / "no-projection")  # no visual_projection
    transformers.CLIPImageProcessor().save_pretrained(tmp_path / "no-projection")  # crops 224, not 32
    with pytest.raises(FeatxError, match=r"cannot run on the 224x224 crops.*\(32\*32\)"):
        get_model("hf:featx-test/clip-vision", str(tmp_path / "no-projection"))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(tmp_path / "no-projection")
    with pytest.raises(FeatxError, match="does not hold every weight.*visual_projection"):
        load_model("hf:featx-test/clip-vision", str(tmp_path / "no-projection"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatxError, match="holds no config.json"):
        get_model("hf:featx-test/clip-vision", str(tmp_path / "empty"))
    (tmp_path / "no-processor").mkdir()
    transformers.CLIPVisionModel(vision).config.save_pretrained(tmp_path / "no-processor")
    with pytest.raises(FeatxError, match="holds no preprocessor_config.json"):
        get_model("hf:featx-test/clip-vision", str(tmp_path / "no-processor"))


def test_hf_preprocessing_is_the_image_processors_own(transformers) -> None:
    from featx.models.zoos.hf_zoo import preprocess_of

    image = _images(1, 300)[0][:, :, :200]  # 200 wide, 300 high
    for processor in (transformers.CLIPImageProcessor(), transformers.SiglipImageProcessor(),
                      transformers.ConvNextImageProcessor(size={"shortest_edge": 224}),
                      transformers.ViTImageProcessor(rescale_factor=1 / 127.5, image_mean=[1, 1, 1],
                                                     image_std=[1, 1, 1])):
        p = preprocess_of(processor, "hf:test")
        theirs = processor(TF.to_pil_image(image), return_tensors="pt").pixel_values[0]
        ours = normalize(p, prepare(p, image)[None])[0]  # the tensor path: the same resize as the processor's
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5, type(processor).__name__
    assert (p.resize_mode, p.mean, p.std) == ("squash", (0.5,) * 3, (0.5,) * 3)  # x / 127.5 - 1


def test_hf_missing_checkpoints_offline_are_one_clean_line(transformers, offline_hub, tmp_path) -> None:
    result = run_cli("layers", "--model", "hf:featx-test/absent", cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_error(result, "featx-test/absent", "not in the Hugging Face cache", "--weights PATH")
    dataset = write_images(tmp_path / "images", {"a": 2, "b": 2})
    result = run_cli("extract", str(dataset), "--model", "hf:facebook/dinov2-small", "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 2  # the layer table is known, the weights are not here
    assert_clean_error(result, "facebook/dinov2-small", "--weights PATH", str(offline_hub))


def test_layers_of_shipped_hf_checkpoints_answer_without_a_download(offline_hub, tmp_path) -> None:
    result = run_cli("layers", "--model", "hf:openai/clip-vit-base-patch32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.removeprefix("*").split()[0]: int(line.removeprefix("*").split()[1])
            for line in result.stdout.splitlines()[1:]}
    assert (rows["block11_cls"], rows["pool"], rows["embed"]) == (768, 768, 512)
    assert "resize 224 (bicubic), crop 224" in result.stdout
    from featx.models.zoos import hf_zoo

    if not catalog.ships(hf_zoo):
        pytest.skip("the catalog was made with another transformers than the installed one")
    code = ("import sys; from featx.models import get_model; s = get_model('hf:facebook/dinov2-small'); "
            "print(s.layer('cls+mean').dim, s.preprocess.resize, 'torch' in sys.modules)")
    env = {**os.environ, "FEATX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    shipped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=False)
    assert shipped.returncode == 0 and shipped.stdout.split() == ["768", "256", "False"], shipped.stderr


@pytest.mark.parametrize("repo", ["facebook/dinov2-small", "facebook/dinov2-giant",
                                  "openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14-336",
                                  "google/siglip-base-patch16-224"])
def test_shipped_hf_tables_are_what_the_known_configs_give(transformers, offline_hub, repo) -> None:
    from featx.models.zoos import hf_zoo

    if not catalog.ships(hf_zoo):
        pytest.skip("the catalog was made with another transformers than the installed one; "
                    "rebuild it with python -m featx.models.catalog")
    name = hf_zoo.PREFIX + repo
    (weights,) = hf_zoo.weight_sets(name)  # from the shipped config and processor: nothing is cached
    assert catalog.weights_of(name, hf_zoo) == [weights]
    layers, defaults = hf_zoo.layer_table(name, weights.tag, weights.preprocess.crop)
    assert catalog.layers_of(name, hf_zoo, weights.preprocess.crop) == (layers, defaults)


# --- preprocessing ----------------------------------------------------------------------------

def test_squash_resizes_both_sides_and_old_records_read_the_same() -> None:
    image = _images(1, 64)[0][:, :, :32]  # 32 wide, 64 high
    squash = Preprocess(resize=16, crop=16, resize_mode="squash")
    shortest = Preprocess(resize=16, crop=16)
    expected = TF.resize(image, [16, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(prepare(squash, image), expected)
    assert not torch.equal(prepare(shortest, image), expected)  # a crop of the middle instead
    assert "resize_mode" not in shortest.to_dict()  # caches and catalogs made before read the same
    assert Preprocess.from_dict(squash.to_dict()) == squash
    assert Preprocess.from_dict(shortest.to_dict()) == shortest
    with pytest.raises(ValueError, match="unknown resize mode"):
        Preprocess(resize_mode="longest")


@pytest.mark.parametrize("model, extra", [("openclip:ViT-B-32/laion2b_s34b_b79k", "clip"),
                                          ("hf:facebook/dinov2-small", "hf")])
def test_a_missing_extra_is_a_clear_error(monkeypatch, model, extra) -> None:
    for module in ("open_clip", "transformers"):
        monkeypatch.setitem(sys.modules, module, None)  # its import now fails
    with pytest.raises(FeatxError, match=rf"pip install 'featx\[{extra}\]'"):
        load_model(model)
