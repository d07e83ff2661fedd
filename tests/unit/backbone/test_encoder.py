"""Backbone: shapes on the tiny random model, determinism, block choice, sizes, weights sources."""

from __future__ import annotations

import numpy as np
import open_clip
import open_clip.pretrained as oc_pretrained
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from harmoniad.backbone import (
    TINY_BACKBONE,
    TINY_MODEL,
    WEIGHTS_ENV,
    Backbone,
    BackboneConfig,
    BackboneError,
    BackboneWeightsError,
    default_layers,
    file_sha256,
    register_model_configs,
    resolve_spec,
)
from harmoniad.runtime.serialization import from_dict, to_dict

TEST_TAG = "harmoniadtest"
TEST_HUB_REPO = "harmoniad/tiny-test"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No test may reach the network: empty caches, downloads replaced by a failure."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("HARMONIAD_ALLOW_DOWNLOAD", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
        monkeypatch.setattr(oc_pretrained, name, no_network)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return Backbone(TINY_BACKBONE, "cpu")


@pytest.fixture()
def test_tag(monkeypatch):
    """Give the tiny model a pretrained tag (as ViT-L-14-336 has 'openai'), hosted on a fake hub repo."""
    register_model_configs()
    cfg = oc_pretrained._pcfg(hf_hub=f"{TEST_HUB_REPO}/", quick_gelu=True)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY_MODEL, {TEST_TAG: cfg})
    return BackboneConfig(model=TINY_MODEL, weights=TEST_TAG, image_size=128)


def _images(n: int, seed: int = 0, size: tuple[int, int] = (128, 128)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _other_weights() -> dict[str, torch.Tensor]:
    """A tiny-model state dict different from the seeded random one."""
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = open_clip.create_model(TINY_MODEL)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _reference_features(state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    model = Backbone(TINY_BACKBONE, "cpu")
    model.model.load_state_dict(state)
    return model.extract(x)


# -- shapes and basics -------------------------------------------------------------------------
def test_tiny_shapes_dtypes_and_facts(tiny):
    images = _images(2) + _images(1, seed=1, size=(60, 90))
    x = tiny.preprocess(images)
    assert x.shape == (3, 3, 128, 128) and x.dtype == torch.float32
    feats = tiny.extract(x)
    assert len(feats) == tiny.num_layers == 4
    assert tiny.layers == (1, 2, 3, 4) and tiny.grid == (16, 16) and tiny.embed_dim == 64
    for f in feats:
        assert f.shape == (3, 64, 16, 16) and f.dtype == torch.float32
        assert not f.is_inference() and not f.requires_grad and torch.isfinite(f).all()
    assert not torch.allclose(feats[0][0], feats[0][1])  # different images, different features
    assert [f.shape for f in tiny(x)] == [f.shape for f in feats]


def test_outputs_feed_a_trainable_head(tiny):
    head = nn.Conv2d(64, 8, 1)
    out = head(tiny.extract(tiny.preprocess(_images(1)))[0]).sum()
    out.backward()  # would fail on inference tensors
    assert head.weight.grad is not None


def test_preprocess_uses_mean_std_and_checks_input(tiny):
    mean = np.array(resolve_spec(TINY_BACKBONE).mean)
    flat = np.broadcast_to(np.round(mean * 255).astype(np.uint8), (50, 70, 3)).copy()
    x = tiny.preprocess([flat])
    assert x.shape == (1, 3, 128, 128)
    assert x.abs().max() < 0.01  # resized and normalized to ~0
    with pytest.raises(ValueError, match="image 1 must be an H x W x 3 uint8"):
        tiny.preprocess([flat, flat[..., 0]])
    with pytest.raises(ValueError, match="uint8"):
        tiny.preprocess([flat.astype(np.float32)])
    with pytest.raises(ValueError, match="B x 3 x 128 x 128"):
        tiny.extract(torch.zeros(1, 3, 64, 64))


def test_frozen_and_stays_in_eval(tiny):
    parent = nn.Sequential(tiny)
    parent.train()
    assert not tiny.training and not tiny.model.training
    assert not any(p.requires_grad for p in tiny.parameters())


def test_text_and_projected_patch_tokens(tiny):
    text = tiny.encode_text(["a photo of a flawless object", "a photo of a damaged object", "x"])
    assert text.shape == (3, tiny.joint_dim) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    x = tiny.preprocess(_images(2))
    tokens = tiny.patch_tokens_projected(x)
    assert tokens.shape == (2, 16 * 16, tiny.joint_dim)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 256))
    # Same computation by hand: last block's patch tokens, ln_post, proj.
    visual = tiny.model.visual
    with torch.no_grad():
        h = visual._embeds(x)
        for block in visual.transformer.resblocks:
            h = block(h)
        manual = torch.nn.functional.normalize(visual.ln_post(h[:, 1:]) @ visual.proj, dim=-1)
    torch.testing.assert_close(tokens, manual, rtol=1e-4, atol=1e-5)
    scores = tokens @ text.T  # the zero-shot use: patch-to-prompt similarity
    assert scores.shape == (2, 256, 3)


# -- determinism and block choice --------------------------------------------------------------
def test_random_weights_are_deterministic_and_leave_global_rng_alone(tiny):
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    other = Backbone(TINY_BACKBONE, "cpu")
    assert torch.equal(torch.rand(3), expected)  # building did not consume the caller's RNG
    for (name, a), b in zip(tiny.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    x = tiny.preprocess(_images(2))
    for a, b in zip(tiny.extract(x), other.extract(x)):
        assert torch.equal(a, b)
    assert other.key == tiny.key == resolve_spec(TINY_BACKBONE).key


def test_layers_selection_matches_a_manual_forward(tiny):
    chosen = Backbone(BackboneConfig(TINY_MODEL, "random", 128, layers=(2, 4)), "cpu")
    assert chosen.num_layers == 2 and chosen.layers == (2, 4)
    x = tiny.preprocess(_images(2))
    feats = chosen.extract(x)
    visual = tiny.model.visual
    with torch.no_grad():
        h = visual._embeds(x)
        manual = []
        for block in visual.transformer.resblocks:
            h = block(h)
            manual.append(h[:, 1:].reshape(2, 16, 16, 64).permute(0, 3, 1, 2))
    torch.testing.assert_close(feats[0], manual[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[1], manual[3], rtol=1e-4, atol=1e-5)
    assert chosen.key != tiny.key


def test_default_layers():
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)
    assert default_layers(2) == (1, 2)
    assert resolve_spec(BackboneConfig()).layers == (6, 12, 18, 24)  # ViT-L-14-336, no weights read


@pytest.mark.parametrize("layers", [(0, 2), (2, 5), (3, 2), (2, 2)])
def test_invalid_layers_are_refused(layers):
    with pytest.raises(BackboneError, match=r"harmoniad-tiny \(4 blocks\).*1\.\.4"):
        resolve_spec(BackboneConfig(TINY_MODEL, "random", 128, layers=layers))


def test_bad_configs_are_refused():
    with pytest.raises(BackboneError, match="not a multiple of the patch size 8"):
        resolve_spec(BackboneConfig(TINY_MODEL, "random", 100))
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-Nope'"):
        resolve_spec(BackboneConfig("ViT-Nope", "random", 224))
    with pytest.raises(BackboneError, match="not a plain open_clip VisionTransformer"):
        resolve_spec(BackboneConfig("RN50", "random", 224))
    with pytest.raises(BackboneError, match="positive integer"):
        BackboneConfig(image_size=0)
    with pytest.raises(BackboneWeightsError, match="neither a pretrained tag of harmoniad-tiny"):
        resolve_spec(BackboneConfig(TINY_MODEL, "laion9000", 128))


def test_config_round_trips_through_json_dicts():
    cfg = BackboneConfig(TINY_MODEL, "random", 64, layers=(2, 4), quick_gelu=True)
    data = to_dict(cfg)
    assert data["layers"] == (2, 4) or data["layers"] == [2, 4]
    back = from_dict(BackboneConfig, {**data, "layers": [2, 4]})
    assert back == cfg and isinstance(back.layers, tuple)


def test_key_names_everything_that_changes_features():
    keys = {
        resolve_spec(cfg).key
        for cfg in [
            TINY_BACKBONE,
            BackboneConfig(TINY_MODEL, "random", 64),
            BackboneConfig(TINY_MODEL, "random", 128, layers=(4,)),
            BackboneConfig(TINY_MODEL, "random", 128, quick_gelu=True),
            BackboneConfig("ViT-B-16", "random", 224),
            BackboneConfig("ViT-B-16", "openai", 224),
        ]
    }
    assert len(keys) == 6
    assert resolve_spec(TINY_BACKBONE).key == f"harmoniad-tiny_random0-oc{open_clip.__version__}_128_L1-2-3-4"
    assert all("/" not in k and " " not in k for k in keys)


def test_non_native_image_size(tiny):
    small = Backbone(BackboneConfig(TINY_MODEL, "random", 64), "cpu")
    assert small.grid == (8, 8)
    feats = small.extract(small.preprocess(_images(2)))
    assert [f.shape for f in feats] == [(2, 64, 8, 8)] * 4
    assert small.model.visual.positional_embedding.shape == (8 * 8 + 1, 64)


# -- weights from files ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_local_file_weights(tmp_path, tiny, fmt):
    state = _other_weights()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = Backbone(BackboneConfig(TINY_MODEL, str(path), 128), "cpu")
    x = tiny.preprocess(_images(2))
    for a, b in zip(loaded.extract(x), _reference_features(state, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(loaded.extract(x)[0], tiny.extract(x)[0])
    prov = loaded.provenance()
    sha = file_sha256(path)
    assert prov["weights"] == "file" and prov["random"] is False and prov["weights_sha256"] == sha
    assert f"file-{sha[:16]}" in loaded.key


def test_file_weights_at_another_image_size(tmp_path):
    state = _other_weights()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    small = Backbone(BackboneConfig(TINY_MODEL, str(path), 64), "cpu")  # pos-embed resized by open_clip
    assert small.extract(small.preprocess(_images(1)))[0].shape == (1, 64, 8, 8)
    torch.testing.assert_close(small.model.visual.proj, state["visual.proj"])


def test_torchscript_archive_weights(tmp_path, tiny):
    """OpenAI's original .pt files are TorchScript archives, refused by torch.load(weights_only)."""
    state = _other_weights()
    register_model_configs()
    model = open_clip.create_model(TINY_MODEL)
    model.load_state_dict(state)
    with pytest.warns(FutureWarning):
        torch.jit.script(model).save(str(tmp_path / "jit.pt"))
    loaded = Backbone(BackboneConfig(TINY_MODEL, str(tmp_path / "jit.pt"), 128), "cpu")
    x = tiny.preprocess(_images(1))
    torch.testing.assert_close(loaded.extract(x)[3], _reference_features(state, x)[3], rtol=0, atol=0)


def test_unusable_weights_file_is_a_named_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneWeightsError, match="nope.safetensors.*does not exist"):
        Backbone(BackboneConfig(TINY_MODEL, str(missing), 128), "cpu")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(BackboneWeightsError, match="could not load weights file .*wrong.safetensors.* into harmoniad-tiny"):
        Backbone(BackboneConfig(TINY_MODEL, str(wrong), 128), "cpu")


# -- weights from a pretrained tag ---------------------------------------------------------------
def test_missing_tag_weights_name_model_tag_file_and_remedy(test_tag):
    with pytest.raises(BackboneWeightsError) as err:
        Backbone(test_tag, "cpu")
    message = str(err.value)
    for part in (TINY_MODEL, TEST_TAG, f"{TEST_HUB_REPO}/open_clip_model.safetensors", WEIGHTS_ENV, "weights='/path"):
        assert part in message, part
    # The key (and so cached features) needs no weights at all.
    assert resolve_spec(test_tag).key.startswith(f"{TINY_MODEL}_{TEST_TAG}_")


def test_failed_download_is_a_named_error(test_tag, monkeypatch):
    calls = []

    def unreachable(cfg, *args, **kwargs):
        calls.append(cfg["hf_hub"])
        raise OSError("network is unreachable")

    monkeypatch.setattr(oc_pretrained, "download_pretrained", unreachable)
    with pytest.raises(BackboneWeightsError, match=r"could not download weights harmoniad-tiny/harmoniadtest \(OSError: network"):
        Backbone(test_tag, "cpu", allow_download=True)
    assert calls == [f"{TEST_HUB_REPO}/"]


def test_env_file_overrides_the_tag_and_keeps_its_settings(tmp_path, monkeypatch, test_tag, tiny):
    state = _other_weights()
    path = tmp_path / "override.bin"
    torch.save(state, path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    loaded = Backbone(test_tag, "cpu")
    prov = loaded.provenance()
    assert prov["weights"] == "file" and prov["tag"] == TEST_TAG and prov["weights_source"] == f"env {WEIGHTS_ENV}"
    assert prov["quick_gelu"] is True  # from the tag, as OpenAI weights need
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    x = tiny.preprocess(_images(1))
    with torch.random.fork_rng(devices=[]):
        reference = Backbone(BackboneConfig(TINY_MODEL, "random", 128, quick_gelu=True), "cpu")
    reference.model.load_state_dict(state)
    torch.testing.assert_close(loaded.extract(x)[2], reference.extract(x)[2], rtol=0, atol=0)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "absent.bin"))
    with pytest.raises(BackboneWeightsError, match=f"{WEIGHTS_ENV}=.*absent.bin.*harmoniadtest"):
        resolve_spec(test_tag)


def test_env_file_does_not_override_random_or_explicit_files(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "whatever.bin"))
    assert resolve_spec(TINY_BACKBONE).weights_kind == "random"


def test_tag_weights_are_found_in_the_hub_cache_without_network(tmp_path, test_tag, tiny):
    state = _other_weights()
    repo = tmp_path / "hf" / ("models--" + TEST_HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    loaded = Backbone(test_tag, "cpu")
    prov = loaded.provenance()
    assert prov["weights"] == TEST_TAG and prov["random"] is False
    assert prov["weights_path"] == str(snapshot / "open_clip_model.safetensors")
    assert loaded.key == resolve_spec(test_tag).key
