"""Multi-class joint training of HarmoniAD from cached backbone features (DESIGN section 2, step 8).

One model is trained on the normal training images of every chosen category together.
The loop reads features batch by batch from a :class:`FeatureSource` (the on-disk feature
cache for real backbones, whose features do not fit in memory; in-memory tensors for tests).

Reproducible and resumable: batch order and dropout masks come from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, and the learning rate is a pure function of the
step, so a run restarted from its periodic checkpoint continues exactly where it stopped
and ends with the same weights as an uninterrupted run: bit for bit on CPU (same thread
count), up to the rounding of non-deterministic kernels on CUDA.

Files (no pickle anywhere; everything is safetensors or JSON):

- ``out_dir/train_state.safetensors``: the periodic training state, model and AdamW
  tensors plus a JSON header (step, optimizer hyper-parameters, configs) in the file's
  metadata. One file, so one atomic rename replaces it; deleted once training ends.
- ``out_dir/model.safetensors`` + ``out_dir/config.json``: the final checkpoint, enough to
  rebuild the model and its backbone settings (:func:`load_checkpoint`). ``config.json`` is
  written last, so its presence means the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import harmoniad
from harmoniad import distributed
from harmoniad.atomic import atomic_path, atomic_write_text
from harmoniad.backbone import BackboneConfig
from harmoniad.config import ConfigError, from_dict, to_dict
from harmoniad.device import autocast, resolve_device
from harmoniad.fastpath import maybe_compile
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.progress import Cancelled, Progress, ProgressFn, silent

CHECKPOINT_FORMAT = "harmoniad-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FORMAT = "harmoniad-train-state"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint or training state that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``max_steps`` (when set) replaces ``epochs`` as the length."""

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    amp: bool = True
    #: ``torch.compile`` the heads (pays off on long GPU runs; does not change the result).
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_fraction must be in [0, 1) and min_lr_ratio in [0, 1]")

    def total_steps(self, num_items: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(num_items / self.batch_size)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_fraction`` of the run, then cosine decay to ``lr * min_lr_ratio``."""
        warmup = int(round(self.warmup_fraction * total))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        low = self.lr * self.min_lr_ratio
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


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


# -- feature sources -------------------------------------------------------------------------


@runtime_checkable
class FeatureSource(Protocol):
    """Training features, loaded a batch at a time: ``load(indices)`` -> per layer ``N x C x h x w``."""

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TensorSource:
    """In-memory features (tests, tiny backbones): a list of per-layer ``N x C x h x w`` tensors."""

    def __init__(self, feats: Sequence[torch.Tensor], description: dict[str, Any] | None = None) -> None:
        if not feats or any(f.ndim != 4 or f.shape[0] != feats[0].shape[0] for f in feats):
            raise ValueError("TensorSource needs per-layer N x C x h x w tensors with the same N")
        self.feats = list(feats)
        self._description = dict(description or {})

    def __len__(self) -> int:
        return int(self.feats[0].shape[0])

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return [f[idx].float() for f in self.feats]

    def describe(self) -> dict[str, Any]:
        return {"images": len(self), **self._description}


class CacheSource:
    """Features of image files read through :class:`harmoniad.features.FeatureCache`, one batch at a time."""

    def __init__(self, cache: Any, paths: Sequence[Path], description: dict[str, Any] | None = None) -> None:
        if not paths:
            raise ValueError("CacheSource: no training images")
        self.cache = cache
        self.paths = [Path(p) for p in paths]
        self._description = dict(description or {})

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.cache.load([self.paths[i] for i in indices])

    def describe(self) -> dict[str, Any]:
        # surrogateescape: a file name that is not UTF-8 hashes by its bytes instead of failing.
        names = "\n".join(sorted(str(p) for p in self.paths)).encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(names).hexdigest()[:16]
        return {"images": len(self), "paths_sha256": digest, **self._description}


def source_from_samples(
    samples: Sequence[Any],
    backbone: BackboneConfig,
    *,
    cache_root: Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
) -> CacheSource:
    """Extract (or find) the cached features of normal training samples and wrap them."""
    from harmoniad.features import FeatureCache

    if not samples:
        raise ValueError("train: no training samples")
    anomalous = [s.image_path for s in samples if s.label != 0]
    if anomalous:
        raise ValueError(
            f"train: HarmoniAD trains on normal images only, got {len(anomalous)} anomalous samples "
            f"(first: {anomalous[0]})"
        )
    cache = FeatureCache(backbone, root=cache_root, device=device)
    paths = [s.image_path for s in samples]
    # Collective under torchrun (every rank trains on the same samples): each extracts a share.
    cache.ensure(paths, progress=progress, distributed=True)
    categories = sorted({s.category for s in samples})
    return CacheSource(cache, paths, {"categories": categories})


# -- training --------------------------------------------------------------------------------


def _derived_seed(seed: int, stream: str, index: int) -> int:
    """A seed for one (stream, index), stable across processes (no Python ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_model(cfg: ModelConfig, in_dim: int, num_layers: int, seed: int) -> HarmoniAD:
    """A freshly initialised model, seeded without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, "init", 0))
        return HarmoniAD(cfg, in_dim, num_layers)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_derived_seed(seed, "order", epoch))
    return torch.randperm(n, generator=gen)


def train(
    data: Sequence[Any] | FeatureSource,
    backbone: BackboneConfig | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    cache_root: Path | None = None,
    device: str | torch.device = "auto",
) -> Path:
    """Train one HarmoniAD model on ``data`` and write the checkpoint to ``out_dir``.

    ``data`` is either a list of normal training samples (features come from the feature
    cache of ``backbone``) or a :class:`FeatureSource`. A complete checkpoint with the same
    settings already in ``out_dir`` is returned as is; a training state there is resumed.
    Raises :class:`Cancelled` (after saving the state) when the progress callback asks to stop.

    Under ``torchrun`` (:mod:`harmoniad.distributed`) every rank calls this with the same
    arguments: the model is wrapped in DDP, each rank computes its slice of every global
    batch (:func:`~harmoniad.distributed.split_batch`, weighted so the averaged gradient is
    that of the mean over the whole batch), only rank 0 reports progress and writes the
    state and the checkpoint, and all ranks return once the checkpoint is on disk.
    """
    out = Path(out_dir)
    dev = distributed.device(device)
    main = distributed.is_main()
    if not main:
        progress = silent
    if isinstance(data, FeatureSource):
        source: FeatureSource = data
    else:
        if backbone is None:
            raise ValueError("train: training from samples needs a backbone config")
        source = source_from_samples(data, backbone, cache_root=cache_root, device=dev, progress=progress)
    n = len(source)
    if n == 0:
        raise ValueError("train: the feature source is empty")
    probe = source.load([0])
    in_dim, num_layers, grid = int(probe[0].shape[1]), len(probe), (int(probe[0].shape[2]), int(probe[0].shape[3]))
    info = CheckpointInfo(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        code_version=harmoniad.__version__,
        model=model_cfg,
        backbone=backbone,
        train=train_cfg,
        in_dim=in_dim,
        num_layers=num_layers,
        grid=grid,
        data=source.describe(),
    )
    identity = _identity(info)
    if (out / CONFIG_FILE).is_file():
        done = read_checkpoint_info(out)
        if _identity(done) != identity:
            raise CheckpointError(
                f"{out / CONFIG_FILE}: a finished checkpoint with different settings is already there; "
                "choose another output directory or delete it"
            )
        return out

    model = build_model(model_cfg, in_dim, num_layers, train_cfg.seed).to(dev)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay
    )
    step = _load_state(out / STATE_FILE, model, optimizer, identity)
    net: Any = model
    if distributed.active():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    net = maybe_compile(net, train_cfg.compile)
    total = train_cfg.total_steps(n)
    steps_per_epoch = math.ceil(n / train_cfg.batch_size)
    meter = Progress("train", total, progress, start=step)
    t0 = time.monotonic()
    loss_value = float("nan")
    model.train()
    order_epoch, order = -1, torch.empty(0, dtype=torch.long)
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, _epoch_order(train_cfg.seed, epoch, n)
        batch = order[pos * train_cfg.batch_size : (pos + 1) * train_cfg.batch_size].tolist()
        local, weight = distributed.split_batch(batch)  # (batch, 1.0) in a single process
        feats = [f.to(dev, non_blocking=True) for f in source.load(local)]
        lr = train_cfg.lr_at(step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stream = "dropout" if distributed.rank() == 0 else f"dropout.rank{distributed.rank()}"
        gen = torch.Generator(device=dev).manual_seed(_derived_seed(train_cfg.seed, stream, step))
        with autocast(dev, enabled=train_cfg.amp):
            output = net(feats, generator=gen)
        losses = model.loss(output)
        optimizer.zero_grad(set_to_none=True)
        (losses.total if weight == 1.0 else losses.total * weight).backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        step += 1
        loss_value = float(losses.total.detach())
        if distributed.active():  # the mean over the global batch, the same on every rank
            loss_value = float(distributed.all_reduce_sum([loss_value * weight / distributed.world_size()]))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train: loss became {loss_value} at step {step}; lower lr or check the features")
        saved = False
        if main and step % train_cfg.checkpoint_every == 0 and step < total:
            _save_state(out / STATE_FILE, model, optimizer, step, identity)
            saved = True
        try:
            meter.update(1, loss=loss_value, lr=lr, epoch=epoch + 1)
        except Cancelled:
            if not saved:
                _save_state(out / STATE_FILE, model, optimizer, step, identity)
            raise

    result = {"steps": total, "final_loss": loss_value, "wall_s": round(time.monotonic() - t0, 3),
              "device": str(dev), "world_size": distributed.world_size()}
    if main:
        save_checkpoint(out, model, info, result)
        (out / STATE_FILE).unlink(missing_ok=True)
    distributed.barrier()  # the other ranks return once the checkpoint is there to load
    return out


def _identity(info: CheckpointInfo) -> str:
    """What must match for a state or checkpoint to belong to this run (not code version or results)."""
    d = to_dict(info)
    keep = {k: d[k] for k in ("model", "backbone", "train", "in_dim", "num_layers", "grid", "data")}
    keep["train"] = {k: v for k, v in keep["train"].items() if k != "compile"}  # same weights either way
    return json.dumps(keep, sort_keys=True)


# -- training state --------------------------------------------------------------------------


def _save_state(path: Path, model: HarmoniAD, optimizer: torch.optim.Optimizer, step: int, identity: str) -> None:
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


def _load_state(path: Path, model: HarmoniAD, optimizer: torch.optim.Optimizer, identity: str) -> int:
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
