"""Training state and final checkpoints of HarmoniAD (no pickle anywhere: safetensors or JSON).

- ``out_dir/train_state.safetensors``: the periodic training state, model and AdamW
  tensors plus a JSON header (step, optimizer hyper-parameters, configs) in the file's
  metadata. One file, so one atomic rename replaces it; deleted once training ends.
- ``out_dir/model.safetensors`` + ``out_dir/config.json``: the final checkpoint, enough to
  rebuild the model and its backbone settings (:func:`load_checkpoint`). ``config.json`` is
  written last, so its presence means the checkpoint is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harmoniad.backbone import BackboneConfig
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.runtime.device import resolve_device
from harmoniad.runtime.atomic import atomic_path, atomic_write_text
from harmoniad.runtime.serialization import ConfigError, from_dict, to_dict
from harmoniad.train.config import TrainConfig

CHECKPOINT_FORMAT = "harmoniad-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FORMAT = "harmoniad-train-state"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint or training state that cannot be used; the message names the file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """The content of ``config.json``: everything needed to rebuild and describe a model."""

    format: str
    format_version: int
    code_version: str
    model: ModelConfig
    backbone: BackboneConfig | None
    train: TrainConfig
    in_dim: int
    num_layers: int
    grid: tuple[int, int]
    data: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)



def run_identity(info: CheckpointInfo) -> str:
    """What must match for a state or checkpoint to belong to this run (not code version or results)."""
    d = to_dict(info)
    keep = {k: d[k] for k in ("model", "backbone", "train", "in_dim", "num_layers", "grid", "data")}
    keep["train"] = {k: v for k, v in keep["train"].items() if k != "compile"}  # same weights either way
    return json.dumps(keep, sort_keys=True)


# -- training state --------------------------------------------------------------------------


def save_state(path: Path, model: HarmoniAD, optimizer: torch.optim.Optimizer, step: int, identity: str) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    header = {"format": STATE_FORMAT, "step": step, "identity": identity,
              "param_groups": opt["param_groups"], "optim_scalars": scalars}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"harmoniad": json.dumps(header)})


def load_state(path: Path, model: HarmoniAD, optimizer: torch.optim.Optimizer, identity: str) -> int:
    """Restore a saved training state into ``model``/``optimizer``; returns its step (0 if none)."""
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["harmoniad"])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable state is reported the same way
        raise CheckpointError(
            f"{path}: unreadable training state ({type(exc).__name__}: {exc}); delete it to restart"
        ) from exc
    if header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a HarmoniAD training state")
    if header.get("identity") != identity:
        raise CheckpointError(
            f"{path}: this training state was written with different settings or data; "
            "delete it to start over or use another output directory"
        )
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_weights_checked(model, model_state, path)
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, entry in header["optim_scalars"].items():
            state.setdefault(int(pid), {}).update(entry)
        groups = header["param_groups"]
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        return int(header["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: damaged optimizer state in the training state ({type(exc).__name__}: {exc}); "
            "delete it to restart"
        ) from exc


# -- final checkpoint ------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, model: HarmoniAD, info: CheckpointInfo, result: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``config.json`` (atomically, the config last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / MODEL_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    record = to_dict(info)
    record["result"] = result
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Parse and strictly validate ``config.json`` of a checkpoint directory."""
    config_path = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{config_path}: missing; not a finished HarmoniAD checkpoint directory") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting bomb
        raise CheckpointError(f"{config_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        # Checkpoints written before FSAM's position queries became the default decoded from tokens.
        raw["model"].setdefault("fsam_queries", "tokens")
        # Checkpoints written before the learned fusion weights used the fixed ones.
        raw["model"].setdefault("fusion_weights", "fixed")
    info = from_dict(CheckpointInfo, raw, where=str(config_path))
    if info.format != CHECKPOINT_FORMAT:
        raise ConfigError(f"{config_path}: format is {info.format!r}, expected {CHECKPOINT_FORMAT!r}")
    if info.format_version != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{config_path}: checkpoint format version {info.format_version}, this code reads {CHECKPOINT_VERSION}"
        )
    return info


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[HarmoniAD, CheckpointInfo]:
    """Rebuild the model of a checkpoint directory, in eval mode on ``device``, with its settings."""
    directory = Path(path)
    info = read_checkpoint_info(directory)
    weights = directory / MODEL_FILE
    # The config is untrusted: check it against the weights file's header on a meta-device
    # skeleton first, so that a crafted size (hidden_dim 10**8) allocates nothing.
    try:
        with torch.device("meta"):
            skeleton = HarmoniAD(info.model, info.in_dim, info.num_layers)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: describes no buildable model ({exc})") from exc
    try:
        with safe_open(str(weights), framework="pt") as fh:
            stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        _check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, stored, weights)
        state = load_file(str(weights))
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights}: missing weights file of checkpoint {directory}") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{weights}: unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
    model = HarmoniAD(info.model, info.in_dim, info.num_layers)
    _load_weights_checked(model, state, weights)
    return model.to(resolve_device(device)).eval(), info


def _load_weights_checked(model: HarmoniAD, state: dict[str, torch.Tensor], where: Path) -> None:
    """``load_state_dict`` with errors that name the file and every mismatching tensor."""
    _check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                  {k: tuple(v.shape) for k, v in state.items()}, where)
    model.load_state_dict(state, strict=True)


def _check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Path) -> None:
    """Refuse weights whose names or shapes differ from the model's, naming the file and tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {found[k]} vs model {v}"
        for k, v in expected.items()
        if k in found and found[k] != v
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(
            f"{where}: weights do not match the model its config describes ({'; '.join(parts)})"
        )
