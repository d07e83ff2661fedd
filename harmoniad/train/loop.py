"""Multi-class joint training of HarmoniAD from cached backbone features (docs/design.md#training).

One model is trained on the normal training images of every chosen category together.
The loop reads features batch by batch from a :class:`FeatureSource` (the on-disk feature
cache for real backbones, whose features do not fit in memory; in-memory tensors for tests).

Reproducible and resumable: batch order and dropout masks come from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, and the learning rate is a pure function of the
step, so a run restarted from its periodic checkpoint continues exactly where it stopped
and ends with the same weights as an uninterrupted run: bit for bit on CPU (same thread
count), up to the rounding of non-deterministic kernels on CUDA.

Checkpoint and training-state files: :mod:`harmoniad.train.checkpoint`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import harmoniad
from harmoniad.backbone import BackboneConfig
from harmoniad.backbone.sources import FeatureSource, source_from_samples
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.runtime import distributed
from harmoniad.runtime.device import autocast, maybe_compile
from harmoniad.runtime.progress import Cancelled, Progress, ProgressFn, silent
from harmoniad.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointInfo,
    load_state,
    read_checkpoint_info,
    run_identity,
    save_checkpoint,
    save_state,
)
from harmoniad.train.config import TrainConfig
from harmoniad.train.fusion import learn_fusion


def _derived_seed(seed: int, stream: str, index: int) -> int:
    """A seed for one (stream, index), stable across processes (no Python ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_model(cfg: ModelConfig, in_dim: int, num_layers: int, seed: int) -> HarmoniAD:
    """A freshly initialised model, seeded without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, "init", 0))
        return HarmoniAD(cfg, in_dim, num_layers)


def _batches(source: FeatureSource, batch_size: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Every item of ``source`` once, in order, a batch at a time on ``device``."""
    for start in range(0, len(source), batch_size):
        yield [f.to(device) for f in source.load(range(start, min(start + batch_size, len(source))))]


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

    Under ``torchrun`` (:mod:`harmoniad.runtime.distributed`) every rank calls this with the same
    arguments: the model is wrapped in DDP, each rank computes its slice of every global
    batch (:func:`~harmoniad.runtime.distributed.split_batch`, weighted so the averaged gradient is
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
    identity = run_identity(info)
    if (out / CONFIG_FILE).is_file():
        done = read_checkpoint_info(out)
        if run_identity(done) != identity:
            raise CheckpointError(
                f"{out / CONFIG_FILE}: a finished checkpoint with different settings is already there; "
                "choose another output directory or delete it"
            )
        return out

    model = build_model(model_cfg, in_dim, num_layers, train_cfg.seed).to(dev)
    # Target statistics of the training normals (a resumed state carries the same values).
    model.fit_normalisation(_batches(source, train_cfg.batch_size, dev))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay
    )
    step = load_state(out / STATE_FILE, model, optimizer, identity)
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
    orders: dict[int, torch.Tensor] = {}

    def step_batch(s: int) -> tuple[int, list[int], float]:
        """(epoch, this rank's indices, loss weight) of step ``s``: a pure function of the seed."""
        epoch, pos = divmod(s, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = _epoch_order(train_cfg.seed, epoch, n)
        batch = orders[epoch][pos * train_cfg.batch_size : (pos + 1) * train_cfg.batch_size].tolist()
        local, weight = distributed.split_batch(batch)  # (batch, 1.0) in a single process
        return epoch, local, weight

    # The next step's features load on a background thread while this step computes
    # (cache files read, or a live backbone run), so the device does not wait on them.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmoniad-train-loader")
    upcoming = loader.submit(source.load, step_batch(step)[1]) if step < total else None
    try:
        while step < total:
            epoch, local, weight = step_batch(step)
            assert upcoming is not None
            loaded = upcoming.result()
            upcoming = loader.submit(source.load, step_batch(step + 1)[1]) if step + 1 < total else None
            feats = [f.to(dev, non_blocking=True) for f in loaded]
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
                save_state(out / STATE_FILE, model, optimizer, step, identity)
                saved = True
            try:
                meter.update(1, loss=loss_value, lr=lr, epoch=epoch + 1)
            except Cancelled:
                if not saved:
                    save_state(out / STATE_FILE, model, optimizer, step, identity)
                raise
    finally:
        if upcoming is not None:
            upcoming.cancel()
        loader.shutdown(wait=True)
        # A failed load leaves its exception in the future, and the exception's traceback holds
        # this frame: dropping the future breaks that cycle, so the model, the optimizer and the
        # DDP wrapper (which holds the process group) are freed with the exception, not at some
        # later garbage collection (after the group is destroyed, or never).
        upcoming = None

    result = {"steps": total, "final_loss": loss_value, "wall_s": round(time.monotonic() - t0, 3),
              "device": str(dev), "world_size": distributed.world_size()}
    if main:
        model.calibrate(_batches(source, train_cfg.batch_size, dev))  # the fusion's statistics of normal maps
        try:
            choice = learn_fusion(model, source, batch_size=train_cfg.batch_size, device=dev,
                                  seed=_derived_seed(train_cfg.seed, "fusion", 0), progress=progress)
        except Cancelled:  # keep the trained weights: a resumed run only redoes the steps after training
            save_state(out / STATE_FILE, model, optimizer, step, identity)
            raise
        if choice is not None:
            result["fusion"] = choice.to_dict()
        save_checkpoint(out, model, info, result)
        (out / STATE_FILE).unlink(missing_ok=True)
    distributed.barrier()  # the other ranks return once the checkpoint is there to load
    return out
