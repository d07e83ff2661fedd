"""Untrusted files: checkpoints load from safetensors + JSON only, never through pickle, and a
crafted config is refused with a clear error before anything is built from it."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import harmoniad
import harmoniad.train.checkpoint as train_mod
from harmoniad.backbone import TINY_BACKBONE
from harmoniad.runtime.serialization import ConfigError
from harmoniad.maps import ScoreConfig
from harmoniad.methods.harmoniad import Scorer
from harmoniad.model import ModelConfig
from harmoniad.train import CONFIG_FILE, MODEL_FILE, CheckpointError, TrainConfig, load_checkpoint, train
from harmoniad.backbone.sources import TensorSource

MODEL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, decoder_heads=2, fsam_window=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a tiny model on the tiny backbone's feature shapes."""
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(4, 64, 16, 16, generator=gen) for _ in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=4, amp=False)
    return train(TensorSource(feats), TINY_BACKBONE, MODEL, cfg, tmp_path_factory.mktemp("ckpt") / "run")


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a loader executed the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unpickling entry point raises: loading must not need any of them."""
    import open_clip  # noqa: F401 - imported first: its dependencies subclass pickle.Unpickler at import

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a pickle loader was called")

    for owner, name in (
        (torch, "load"),
        (torch.serialization, "load"),
        (torch.jit, "load"),
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
    ):
        monkeypatch.setattr(owner, name, refuse)


def test_a_checkpoint_loads_and_scores_without_any_pickle_loader(ckpt: Path, no_unpickling: None) -> None:
    _, info = load_checkpoint(ckpt)
    assert info.model == MODEL and info.backbone == TINY_BACKBONE
    scorer = Scorer.from_checkpoint(ckpt, ScoreConfig(resolution=32), device="cpu", use_cache=False)
    out = scorer.score_features([torch.randn(2, 64, 16, 16) for _ in range(4)])
    assert out.scores.shape == (2,) and torch.isfinite(out.anomaly).all()


def test_a_pickle_disguised_as_safetensors_is_refused_without_running_it(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (ckpt / MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: unreadable safetensors file"):
        load_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "model.ckpt"])
def test_pickled_weights_beside_the_config_are_never_a_fallback(ckpt: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    (ckpt / MODEL_FILE).unlink()
    torch.save({"payload": _Payload(marker)}, ckpt / name)
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: missing weights file"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_the_package_has_no_pickle_loaders(tmp_path: Path) -> None:
    """Static guard: the only unpickling-capable call is the backbone's TorchScript reader for
    OpenAI's original CLIP archives (a restricted unpickler; it never reads our checkpoints)."""
    root = Path(harmoniad.__file__).parent
    pattern = re.compile(
        r"\btorch\.load\(|\bimport pickle\b|\bpickle\.|\bjoblib\b|\bdill\b|allow_pickle\s*=\s*True|\btorch\.jit\.load\("
    )
    hits = [
        f"{p.relative_to(root)}:{i}: {line.strip()}"
        for p in sorted(root.rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert [h for h in hits if not h.startswith("backbone/encoder.py")] == []
    assert all("torch.jit.load" in h or "TorchScript" in h for h in hits), hits


def _deep(depth: int) -> str:
    return '{"format": ' + "[" * depth + "]" * depth + "}"


CRAFTED = [
    ("extra top-level key", lambda r: r.update(exploit="rm -rf /"), r"unknown CheckpointInfo keys \['exploit'\]"),
    ("extra model key", lambda r: r["model"].update(activation="eval"), r"unknown ModelConfig keys \['activation'\]"),
    ("string for int", lambda r: r["model"].update(hidden_dim="16"), r"ModelConfig\.hidden_dim: expected an integer"),
    ("bool for int", lambda r: r["model"].update(hidden_dim=True), r"ModelConfig\.hidden_dim: expected an integer"),
    ("float for int", lambda r: r["model"].update(hidden_dim=16.5), r"ModelConfig\.hidden_dim: expected an integer"),
    ("string for bool", lambda r: r["model"].update(split="yes"), r"ModelConfig\.split: expected bool"),
    ("unknown literal", lambda r: r["model"].update(branches="all"), r"ModelConfig\.branches: expected one of"),
    ("short tuple", lambda r: r.update(grid=[16]), r"CheckpointInfo\.grid: expected 2 items"),
    ("object for tuple", lambda r: r["train"].update(betas={"a": 1}), r"TrainConfig\.betas: expected a list"),
    ("null for config", lambda r: r.update(model=None), r"expected a JSON object for ModelConfig"),
    ("negative size", lambda r: r["model"].update(hidden_dim=-4), r"hidden_dim must be >= 1"),
    ("NaN", lambda r: r["model"].update(cutoff=float("nan")), r"cutoff"),
    ("wrong format", lambda r: r.update(format="pickle"), r"format is 'pickle'"),
    ("future version", lambda r: r.update(format_version=99), r"format version 99"),
    ("backbone extra key", lambda r: r["backbone"].update(url="http://x"), r"unknown BackboneConfig keys \['url'\]"),
]


@pytest.mark.parametrize("edit, match", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_a_crafted_config_is_refused_with_a_clear_error(ckpt: Path, edit, match) -> None:
    record = json.loads((ckpt / CONFIG_FILE).read_text())
    edit(record)
    (ckpt / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match) as caught:
        load_checkpoint(ckpt)
    assert isinstance(caught.value, (ConfigError, CheckpointError))
    assert str(ckpt / CONFIG_FILE) in str(caught.value)  # the message names the file


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2]", "expected a JSON object"),
        ("{'single': 'quotes'}", "not valid JSON"),
        ("", "not valid JSON"),
        (_deep(100_000), "not valid JSON"),
        ('{"format": "caf\xe9"}', "not valid JSON"),
    ],
    ids=["list", "not-json", "empty", "nesting-bomb", "latin-1"],
)
def test_a_config_that_is_not_a_config_object_is_refused(ckpt: Path, text: str, match: str) -> None:
    (ckpt / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises((ConfigError, CheckpointError), match=match):
        load_checkpoint(ckpt)


def test_an_absurd_size_is_refused_before_any_memory_is_allocated(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10-byte edit (hidden_dim 16 -> 10**8) must not make the loader allocate terabytes."""
    record = json.loads((ckpt / CONFIG_FILE).read_text())
    record["model"]["hidden_dim"] = 10**8
    (ckpt / CONFIG_FILE).write_text(json.dumps(record))
    real = train_mod.HarmoniAD

    def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a model of the config's size was allocated before its weights were checked")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "HarmoniAD", guarded)
    with pytest.raises(CheckpointError, match=r"weights do not match"):
        load_checkpoint(ckpt)
