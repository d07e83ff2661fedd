"""harmoniad.runtime.distributed: sharding helpers, and a 2-process gloo job on CPU that gives what one process gives.

The end-to-end test launches this very file under ``python -m torch.distributed.run
--nproc_per_node 2`` (127.0.0.1, a free port) and runs the same scenario in the test
process; features, training (weights, final loss, resume) and evaluation (scores, maps,
metrics) must agree to float tolerance.
"""

from __future__ import annotations

import json
import threading
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.runtime import distributed
from harmoniad.data.loading import decoded_batches
from harmoniad.runtime.device import AdaptiveBatch
from tests.paths import REPO as _REPO

REPO = _REPO
CATEGORIES = ("weave", "flange")
# Training noise and hard-point mining off, so the 2-rank run must match the 1-rank run to float
# tolerance (with dropout on, each rank draws its own masks; with mining, each rank keeps the hardest
# positions of its own slice: the runs then agree statistically, not bitwise).
MODEL = {"feature_noise": 0.0, "token_dropout": 0.0, "bottleneck_dropout": 0.0, "hard_mining_fraction": 1.0,
         "hidden_dim": 32}
# 12 training images in batches of 5: global batches of 5, 5, 2 -> uneven rank slices (3/2, 1/1).
TRAIN = {"max_steps": 6, "batch_size": 5, "lr": 3e-3, "checkpoint_every": 3, "seed": 0}


# -- unit level --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once_and_unshard_restores_order(world):
    for n in range(10):
        parts = [distributed.shard_indices(n, rank_=r, world=world) for r in range(world)]
        flat = sorted(i for part in parts for i in part)
        assert flat == list(range(n))  # no duplicates (no DistributedSampler padding), nothing lost
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        items = [f"x{i}" for i in range(n)]
        assert distributed.unshard([[items[i] for i in part] for part in parts], n) == items


def test_unshard_refuses_a_short_rank():
    with pytest.raises(distributed.DistributedError, match="rank 1 returned 0 results for its 2 of 4"):
        distributed.unshard([["a", "c"], []], 4)


def test_single_process_helpers_are_the_identity(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_shards([1, 2, 3], 3) == [1, 2, 3]
    assert distributed.split_batch([4, 5, 6]) == ([4, 5, 6], 1.0)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_reduce_sum([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert distributed.device("cpu") == torch.device("cpu")
    distributed.barrier()
    with pytest.raises(KeyError):
        distributed.raise_if_any_failed(KeyError("x"), "work")
    distributed.raise_if_any_failed(None, "work")


def test_cleanup_collects_unreachable_holders_of_the_group_before_destroying_it(monkeypatch):
    import gc
    import weakref

    class Holder:  # stands for an object that holds the group, left in a reference cycle
        pass

    holder = Holder()
    holder.me = holder
    gone = weakref.ref(holder)
    del holder
    at_destroy = []
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: at_destroy.append(gone() is None))
    gc.disable()  # no automatic collection in between
    try:
        distributed.cleanup()
    finally:
        gc.enable()
    assert at_destroy == [True]


def test_init_refuses_an_incomplete_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR"):
        distributed.init()


def test_adaptive_batch_halves_on_cuda_oom_and_keeps_the_smaller_size():
    calls = []

    def work(start: int, stop: int) -> list[int]:
        calls.append(stop - start)
        if stop - start > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(start, stop))

    chunks = AdaptiveBatch(8)
    out = chunks.run(7, work)
    assert [i for part in out for i in part] == list(range(7))
    assert chunks.size == 2 and calls == [7, 4, 2, 2, 2, 1]
    assert [i for part in chunks.run(3, work) for i in part] == [0, 1, 2]  # starts at 2 now

    with pytest.raises(torch.cuda.OutOfMemoryError):
        AdaptiveBatch(4, minimum=4).run(4, work)
    with pytest.raises(ValueError, match="not an OOM"):
        AdaptiveBatch(4).run(4, lambda a, b: (_ for _ in ()).throw(ValueError("not an OOM")))


def test_decoding_workers_give_the_same_batches_as_threads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(20, 24), (20, 24), (20, 24), (16, 16), (20, 24)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    threads = list(decoded_batches(paths, 2, workers=2, processes=False))
    workers = list(decoded_batches(paths, 2, workers=2, processes=True))
    assert len(threads) == len(workers) == 3
    assert isinstance(threads[0], torch.Tensor) and threads[0].shape == (2, 20, 24, 3)
    assert isinstance(threads[1], list)  # mixed sizes stay a list of arrays
    for a, b in zip(threads, workers):
        a = a if isinstance(a, list) else list(a.numpy())
        b = b if isinstance(b, list) else list(b.numpy())
        assert len(a) == len(b)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


# -- the same scenario with one and with two processes -----------------------------------------


def _scenario(data: Path, work: Path) -> dict | None:
    """Extract, train (uninterrupted; killed after step 4 and resumed), evaluate; rank 0 returns what to compare."""
    from safetensors import safe_open

    from harmoniad.backbone import TINY_BACKBONE
    from harmoniad.data import load_dataset
    from harmoniad.evaluate import EvalRequest, evaluate
    from harmoniad.backbone.cache import FeatureCache
    from harmoniad.model import ModelConfig
    from harmoniad.store import ResultStore
    from harmoniad.train import STATE_FILE, TrainConfig, train
    from harmoniad.backbone.sources import CacheSource

    torch.set_num_threads(1)
    samples = [s for split in ("train", "test") for s in load_dataset("synthetic", data, split=split)]
    cache = FeatureCache(TINY_BACKBONE, root=work / "features", batch_size=2, device="cpu")
    extracted = cache.ensure([s.image_path for s in samples], distributed=True)
    again = cache.ensure([s.image_path for s in samples], distributed=True)

    normal = load_dataset("synthetic", data, split="train")
    model_cfg, train_cfg = ModelConfig(**MODEL), TrainConfig(**TRAIN)
    source = _CountingSource(CacheSource(cache, [s.image_path for s in normal]))
    losses: list[tuple[int, float]] = []  # (step, loss of the global batch), rank 0 only
    train(source, TINY_BACKBONE, model_cfg, train_cfg, work / "ckpt", device="cpu",
          progress=lambda e: losses.append((e.done, e.info["loss"])) if e.task == "train" else None)
    loaded = distributed.all_gather_object(sum(len(batch) for batch in source.calls))
    # Every rank dies while loading step 5's batch; rank 0 saved the state after step 3.
    resumed = work / "resumed"
    dying = _CountingSource(CacheSource(cache, [s.image_path for s in normal]), die_at_step=5)
    try:
        train(dying, TINY_BACKBONE, model_cfg, train_cfg, resumed, device="cpu")
    except _Killed:
        pass
    distributed.barrier()
    with safe_open(str(resumed / STATE_FILE), "pt") as fh:
        state_step = json.loads(fh.metadata()["harmoniad"])["step"]
    rerun = _CountingSource(CacheSource(cache, [s.image_path for s in normal]))
    train(rerun, TINY_BACKBONE, model_cfg, train_cfg, resumed, device="cpu")

    request = EvalRequest(
        dataset="synthetic",
        root=str(data),
        methods=("harmoniad", "patchcore"),
        backbone=TINY_BACKBONE,
        resolution=32,
        device="cpu",
        options={"harmoniad": {"model": MODEL, "train": TRAIN}},
    )
    store = ResultStore(work / "runs") if distributed.is_main() else None
    run_ids = evaluate(request, store, progress=lambda e: None)
    if not distributed.is_main():
        return None
    return {
        "world": distributed.world_size(),
        "extracted": extracted,
        "loaded_per_rank": loaded,
        "losses": losses,
        "again": again,
        "run_ids": run_ids,
        "state_step": state_step,
        "resumed_steps": len(rerun.calls),
        "state_left": (resumed / STATE_FILE).exists(),
    }


class _Killed(Exception):
    """Stands for the process being killed mid-run."""


class _CountingSource:
    """A training feature source that records what each training step loads (this rank's share).

    Step batches are the loads made on the training loader thread; the shape probe and the
    whole-data passes (target normalisation before training, fusion statistics after) run on
    the calling thread and are not counted. With ``die_at_step``, loading that step's batch
    (1-based) raises :class:`_Killed` instead.
    """

    def __init__(self, inner, die_at_step: int | None = None) -> None:
        self.inner = inner
        self.die_at_step = die_at_step
        self.calls: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, indices):
        if threading.current_thread().name.startswith("harmoniad-train-loader"):
            self.calls.append(list(indices))
            if len(self.calls) == self.die_at_step:
                raise _Killed
        return self.inner.load(indices)

    def describe(self) -> dict:
        return self.inner.describe()


def _failure_report(output: str, tail: int = 3000) -> str:
    """What a failed torchrun job printed that explains it: each fatal error's thread stacks, then the tail.

    The fault handler ends its report with a list of loaded extension modules, long enough to
    push the stacks out of a plain tail of the output.
    """
    faults = []
    start = output.find("Fatal Python error")
    while start != -1:
        end = output.find("Extension modules:", start)
        faults.append(output[start:end if end != -1 else start + 6000])
        start = output.find("Fatal Python error", start + 1)
    return "\n...\n".join([*faults, output[-tail:]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from harmoniad.data import make_synthetic
    from harmoniad.store import ResultStore

    data = make_synthetic(tmp_path / "data", categories=CATEGORIES, n_train=6, n_test=5, size=64)
    one, two = tmp_path / "one", tmp_path / "two"
    env = {
        **os.environ,
        "HARMONIAD_CACHE": str(two / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        # A rank that aborts (SIGABRT, e.g. "terminate called without an active exception", seen
        # twice in CI while the process group outlived the session, see gloo_threads_after_session)
        # prints every thread's Python stack into the output below.
        "PYTHONFAULTHANDLER": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, str(data), str(two),
    ]
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        monkeypatch.setenv("HARMONIAD_CACHE", str(one / "cache"))
        single = _scenario(data, one)  # meanwhile, the same in this process
        output, _ = job.communicate(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, _failure_report(output)
    double = json.loads((two / "result.json").read_text())
    assert single is not None and single["world"] == 1 and double["world"] == 2
    assert double["gloo_threads_after_session"] in ([], None)  # None: no /proc to list threads

    # Extraction: each image once over both ranks, then nothing; the same features.
    n_images = len(list(data.rglob("*/train/good/*.png"))) + len(list(data.rglob("*/test/*/*.png")))
    assert single["extracted"] == double["extracted"] == n_images
    assert single["again"] == double["again"] == 0
    from harmoniad.backbone import TINY_BACKBONE
    from harmoniad.backbone.cache import FeatureCache

    paths = sorted(data.rglob("*.png"))
    paths = [p for p in paths if "ground_truth" not in p.parts]
    for a, b in zip(FeatureCache(TINY_BACKBONE, root=one / "features").load(paths),
                    FeatureCache(TINY_BACKBONE, root=two / "features").load(paths)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)

    # Training: each rank loads its slice of every global batch (6 steps of 5, 5, 2 images)...
    assert single["loaded_per_rank"] == [24]
    assert double["loaded_per_rank"] == [14, 10]  # rank 0: 3+3+1 per epoch, rank 1: 2+2+1
    # ... and DDP over those uneven slices == one process; resuming a 1-process state under DDP too.
    w1, w2 = load_file(str(one / "ckpt" / "model.safetensors")), load_file(str(two / "ckpt" / "model.safetensors"))
    w_resumed = load_file(str(two / "resumed" / "model.safetensors"))
    assert w1.keys() == w2.keys() == w_resumed.keys()
    # atol 5e-5: attention key biases get a gradient that is zero up to rounding (softmax ignores
    # them), and AdamW turns that rounding noise into steps of up to ~1e-5 that differ between
    # the all-reduced and the single-process sums (measured 1.3e-5 on weights of size ~0.2); the
    # tolerance stays far below one AdamW step (about lr = 3e-3 per weight).
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=5e-5, msg=f"DDP weights differ at {k}")
        torch.testing.assert_close(w_resumed[k], w1[k], rtol=1e-4, atol=5e-5, msg=f"resumed weights differ at {k}")
    r1 = json.loads((one / "ckpt" / "config.json").read_text())["result"]
    r2 = json.loads((two / "ckpt" / "config.json").read_text())["result"]
    assert r2["final_loss"] == pytest.approx(r1["final_loss"], rel=1e-4)
    assert (r1["world_size"], r2["world_size"], r1["steps"]) == (1, 2, TRAIN["max_steps"])
    (step1, loss1), (step2, loss2) = single["losses"][0], double["losses"][0]
    assert step1 == step2 == 1 and loss2 == pytest.approx(loss1, rel=1e-5)  # the global batch's loss
    assert single["losses"][-1][1] == pytest.approx(r1["final_loss"]) and r1["final_loss"] < 0.9 * loss1
    assert single["state_step"] == double["state_step"] == 3  # the last periodic state before the kill
    assert single["resumed_steps"] == double["resumed_steps"] == TRAIN["max_steps"] - 3
    assert not single["state_left"] and not double["state_left"]

    # Evaluation: sharded predictions gathered in order; same scores, maps and metrics; one writer.
    s1, s2 = ResultStore(one / "runs"), ResultStore(two / "runs")
    assert len(s2.list_runs()) == len(double["run_ids"]) == 2
    for id1, id2 in zip(single["run_ids"], double["run_ids"]):
        assert s2.get_run(id2).status == "complete"
        m1 = s1.load_metrics(id1).set_index("category").sort_index()
        m2 = s2.load_metrics(id2).set_index("category").sort_index()
        numeric = [c for c in m1.columns if c.startswith(("image_", "pixel_"))]
        assert list(m2["status"]) == ["ok"] * len(CATEGORIES)
        np.testing.assert_allclose(m2[numeric].to_numpy(float), m1[numeric].to_numpy(float), rtol=1e-4, atol=1e-5)
        i1, i2 = s1.load_images(id1), s2.load_images(id2)
        assert list(i1["image_path"]) == list(i2["image_path"])
        np.testing.assert_allclose(i2["score"], i1["score"], rtol=1e-4, atol=1e-6)
        for index in (0, len(i1) - 1):
            maps1, maps2 = s1.load_maps(id1, index), s2.load_maps(id2, index)
            assert maps1.keys() == maps2.keys()
            for name in maps1:
                np.testing.assert_allclose(maps2[name], maps1[name], rtol=1e-3, atol=1e-4)


def _gloo_threads() -> list[str] | None:
    """Names of this process's gloo threads (None where ``/proc`` does not list threads)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def _worker(data: str, work: str) -> None:
    """Entry point of each rank under torchrun."""
    with distributed.session() as joined:
        assert joined and distributed.world_size() == 2
        result = _scenario(Path(data), Path(work))
    if result is not None:
        # Leaving the session destroys the group; threads of a group still referenced somewhere
        # would run on into interpreter shutdown (where their teardown can abort the process).
        result["gloo_threads_after_session"] = _gloo_threads()
        (Path(work) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(*sys.argv[1:3])


def test_oom_is_recognised_in_both_forms_and_nothing_else():
    from harmoniad.runtime.device import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # Older drivers / some kernels: a plain RuntimeError.
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total)"))
    assert is_oom(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_oom(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_oom(ValueError("out of memory"))  # not a device error type

    calls = []

    def work(start: int, stop: int) -> list[int]:
        calls.append(stop - start)
        if stop - start > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return list(range(start, stop))

    chunks = AdaptiveBatch(8)
    assert [i for part in chunks.run(8, work) for i in part] == list(range(8))
    assert chunks.size == 2 and calls[:3] == [8, 4, 2]


def test_batch_size_from_free_memory(monkeypatch):
    from harmoniad.runtime.device import batch_size_for

    assert batch_size_for(torch.device("cpu"), 10**6, default=24) == 24
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140 * gib, 141 * gib))
    cuda = torch.device("cuda", 0)
    # An H200's free memory and ~300 MiB per image (ViT-L-14-336 + heads, bf16): 64..256.
    assert batch_size_for(cuda, 300 << 20, minimum=64, maximum=256) == 232
    assert batch_size_for(cuda, 10 << 20, minimum=64, maximum=256) == 256
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 141 * gib))
    assert batch_size_for(cuda, 300 << 20, minimum=64, maximum=256) == 64  # a busy GPU: OOM halving takes over
