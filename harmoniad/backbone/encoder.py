"""The frozen CLIP image encoder whose patch tokens every method reads (docs/design.md#backbone).

A :class:`BackboneConfig` names an open_clip ViT, its weights and the blocks to tap. It is
resolved into a :class:`BackboneSpec` *without building the model* (shapes, weights identity,
cache key), so that cached features can be found and checked without loading any weights.
:class:`Backbone` builds the model, frozen and in eval mode, and turns images into per-block
patch-token maps ``B x C x h x w``.

Weights (``BackboneConfig.weights``):

- an open_clip pretrained tag (``"openai"``): the file is taken from the open_clip / Hugging
  Face cache; it is downloaded only when asked (``allow_download=True`` or
  ``HARMONIAD_ALLOW_DOWNLOAD=1``). ``HARMONIAD_CLIP_WEIGHTS=/path`` replaces the tag's file
  but keeps the tag's settings (QuickGELU, mean/std), the usual way to run offline;
- a local file path (safetensors, a ``torch.save`` state dict, or an OpenAI TorchScript
  archive), loaded through open_clip's checkpoint loader;
- ``"random"``: a seeded random initialisation, identical in every process, for tests and the
  offline demo (the provenance says ``random: True`` so the dashboard can say so).

Nothing is downloaded or built at import time; the tiny test model is registered with open_clip
on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harmoniad.runtime.device import autocast, cast_for_inference, resolve_device

#: Environment variable naming a local weights file that replaces a pretrained tag's file.
WEIGHTS_ENV = "HARMONIAD_CLIP_WEIGHTS"
#: Environment variable that allows downloading a pretrained tag's file ("1", "true", "yes").
ALLOW_DOWNLOAD_ENV = "HARMONIAD_ALLOW_DOWNLOAD"
#: Seed of the ``"random"`` initialisation; part of the cache key.
RANDOM_SEED = 0
#: Name of the tiny model shipped in ``harmoniad/model_configs`` for tests and the demo.
TINY_MODEL = "harmoniad-tiny"

_MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TEXT_BATCH = 256
# Entries of a TorchScript CLIP state dict that are not open_clip parameters.
_JIT_EXTRA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask"})


class BackboneError(ValueError):
    """A backbone config that cannot work (unknown model, bad layers or image size)."""


class BackboneWeightsError(BackboneError):
    """Weights that are missing or unreadable; the message says how to provide them."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which encoder, which weights, which input size and which blocks.

    ``layers`` are 1-based block indices, strictly increasing; None means 4 evenly spaced
    blocks ending at the last one (6, 12, 18, 24 of 24). ``quick_gelu`` None takes the
    activation from the pretrained tag (or the model config for files and random weights);
    set it for a file whose weights were trained with QuickGELU (e.g. OpenAI's).
    """

    model: str = "ViT-L-14-336"
    weights: str = "openai"
    image_size: int = 336
    layers: tuple[int, ...] | None = None
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise BackboneError(f"BackboneConfig.model must be an open_clip model name, got {self.model!r}")
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise BackboneError(
                f"BackboneConfig.weights must be a pretrained tag, a file path or 'random', got {self.weights!r}"
            )
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise BackboneError(f"BackboneConfig.image_size must be a positive integer, got {self.image_size!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise BackboneError(
                    f"BackboneConfig.layers must be a non-empty tuple of 1-based block indices or None, "
                    f"got {self.layers!r}"
                )
            object.__setattr__(self, "layers", layers)


#: The tiny random open_clip ViT used by tests and the offline demo: 4 blocks of width 64,
#: patch 8 at 128 px (a 16 x 16 grid), with a small text tower for zero-shot baselines.
TINY_BACKBONE = BackboneConfig(model=TINY_MODEL, weights="random", image_size=128, layers=None)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything known about a backbone from its config alone, without loading weights.

    ``weights_kind`` is ``"tag"`` (file from the open_clip/HF cache), ``"file"`` (a local file,
    from the config or from ``HARMONIAD_CLIP_WEIGHTS`` overriding ``tag``) or ``"random"``.
    """

    config: BackboneConfig
    depth: int
    width: int
    joint_dim: int
    patch_size: int
    layers: tuple[int, ...]
    weights_kind: Literal["tag", "file", "random"]
    tag: str | None
    file: Path | None
    file_sha256: str | None
    file_source: str | None
    quick_gelu: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: str

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.patch_size
        return (side, side)

    @property
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """``(C, h, w)`` of each tapped block's map, in ``layers`` order."""
        h, w = self.grid
        return [(self.width, h, w) for _ in self.layers]

    def provenance(self) -> dict[str, Any]:
        """JSON-safe record of what produced the features (stored with runs, shown by the dashboard)."""
        import open_clip

        record: dict[str, Any] = {
            "model": self.config.model,
            "weights": self.tag if self.weights_kind == "tag" else self.weights_kind,
            "random": self.weights_kind == "random",
            "image_size": self.config.image_size,
            "layers": list(self.layers),
            "quick_gelu": self.quick_gelu,
            "key": self.key,
            "open_clip": open_clip.__version__,
        }
        if self.weights_kind == "random":
            record["seed"] = RANDOM_SEED
        if self.weights_kind == "file":
            record["weights_sha256"] = self.file_sha256
            record["weights_path"] = str(self.file)
            record["weights_source"] = self.file_source
            if self.tag is not None:
                record["tag"] = self.tag
        return record


def register_model_configs() -> None:
    """Make the shipped model configs (``harmoniad-tiny``) known to open_clip; idempotent."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIG_DIR)


def default_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced 1-based blocks ending at ``depth`` (24 -> 6, 12, 18, 24)."""
    n = min(count, depth)
    return tuple((depth * (i + 1) + n - 1) // n for i in range(n))


def resolve_spec(config: BackboneConfig) -> BackboneSpec:
    """Check ``config`` against open_clip's model registry and work out shapes, weights and key.

    Reads no weights except to hash a local weights file (its content is part of the key).
    """
    import open_clip
    from open_clip.model import CLIPVisionCfg
    from open_clip.transform import PreprocessCfg

    register_model_configs()
    model_cfg = open_clip.get_model_config(config.model)
    if model_cfg is None:
        raise BackboneError(
            f"unknown open_clip model {config.model!r}; expected one of open_clip.list_models(), "
            f"e.g. 'ViT-L-14-336', 'ViT-B-16' or {TINY_MODEL!r}"
        )
    try:
        vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    except TypeError as exc:
        raise BackboneError(f"open_clip model {config.model!r} has an unsupported vision config: {exc}") from exc
    if vision.timm_model_name or not isinstance(vision.layers, int) or vision.attentional_pool:
        raise BackboneError(
            f"open_clip model {config.model!r} is not a plain open_clip VisionTransformer "
            "(timm, ResNet and attention-pooled towers are not supported); use a ViT such as 'ViT-B-16'"
        )
    depth, patch = vision.layers, vision.patch_size
    if not isinstance(patch, int) or config.image_size % patch != 0:
        raise BackboneError(
            f"BackboneConfig.image_size={config.image_size} is not a multiple of the patch size "
            f"{patch} of {config.model!r}"
        )
    layers = _check_layers(config, depth)

    weights = config.weights.strip()
    default_qg = bool(model_cfg.get("quick_gelu", False))
    pp = PreprocessCfg()
    mean, std = tuple(pp.mean), tuple(pp.std)
    tag: str | None = None
    file: Path | None = None
    sha: str | None = None
    source: str | None = None
    pretrained = open_clip.get_pretrained_cfg(config.model, weights) if weights != "random" else {}
    if weights == "random":
        kind: Literal["tag", "file", "random"] = "random"
        weights_id = f"random{RANDOM_SEED}-oc{open_clip.__version__}"
    elif pretrained:
        tag = weights
        default_qg = bool(pretrained.get("quick_gelu", False))
        mean, std = tuple(pretrained.get("mean", mean)), tuple(pretrained.get("std", std))
        override = os.environ.get(WEIGHTS_ENV, "").strip()
        if override:
            kind, file, source = "file", Path(override).expanduser(), f"env {WEIGHTS_ENV}"
            sha, weights_id = _hash_weights_file(
                file,
                f"{WEIGHTS_ENV}={override!r} (replacing the {tag!r} weights of {config.model}) "
                "is not a file; point it at a local open_clip weights file or unset it",
            )
        else:
            kind = "tag"
            weights_id = tag
    elif _looks_like_path(weights):
        kind, file, source = "file", Path(weights).expanduser(), "config"
        sha, weights_id = _hash_weights_file(
            file,
            f"weights file {str(file)!r} for {config.model} does not exist; give an existing "
            "open_clip weights file (safetensors or a state dict), a pretrained tag, or 'random'",
        )
    else:
        tags = open_clip.list_pretrained_tags_by_model(config.model)
        raise BackboneWeightsError(
            f"{weights!r} is neither a pretrained tag of {config.model} (known: {tags or 'none'}), "
            "nor an existing weights file, nor 'random'"
        )

    quick_gelu = default_qg if config.quick_gelu is None else config.quick_gelu
    key = "_".join(
        [
            _slug(config.model),
            _slug(weights_id) + ("" if quick_gelu == default_qg else f"-qg{int(quick_gelu)}"),
            str(config.image_size),
            "L" + "-".join(map(str, layers)),
        ]
    )
    return BackboneSpec(
        config=config,
        depth=depth,
        width=vision.width,
        joint_dim=int(model_cfg["embed_dim"]),
        patch_size=patch,
        layers=layers,
        weights_kind=kind,
        tag=tag,
        file=file,
        file_sha256=sha,
        file_source=source,
        quick_gelu=quick_gelu,
        mean=mean,
        std=std,
        key=key,
    )


def _hash_weights_file(file: Path, missing: str) -> tuple[str, str]:
    """(SHA-256, weights id) of a local weights file: the id is the hash, so renaming a file keeps its features.

    ``missing`` is the error raised when ``file`` is not a file (it names where the path came from).
    """
    if not file.is_file():
        raise BackboneWeightsError(missing)
    sha = memo_file_sha256(file)
    return sha, f"file-{sha[:16]}"


def backbone_key(config: BackboneConfig) -> str:
    """Short stable string naming the features ``config`` produces (model, weights, size, blocks)."""
    return resolve_spec(config).key


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Process-wide memo for memo_file_sha256, keyed by (resolved path, size, mtime_ns). It is
# module-level, not per object, because one evaluation builds many FeatureCache instances
# (PatchCore, every HarmoniAD variant in training and in Scorer.from_checkpoint, ...) and
# calls resolve_spec several times: each would otherwise re-hash every image and the local
# weights file (~1.7 GB for ViT-L). A file's hash depends only on its bytes, so sharing is
# safe; a rewrite changes size or mtime and misses the memo. Cleared when it grows past
# _SHA_MEMO_MAX entries to stay bounded in long-lived processes (the dashboard).
_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_SHA_MEMO_MAX = 200_000


def memo_file_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`file_sha256`, remembered process-wide per (resolved path, size, mtime_ns)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA_MEMO.get(key)
    if digest is None:
        digest = file_sha256(path)
        if len(_SHA_MEMO) >= _SHA_MEMO_MAX:
            _SHA_MEMO.clear()
        _SHA_MEMO[key] = digest
    return digest


def locate_pretrained(model: str, tag: str, *, allow_download: bool = False) -> Path:
    """The local file of open_clip pretrained ``model``/``tag``: from the caches, else downloaded.

    Downloads only when ``allow_download``; any failure becomes a :class:`BackboneWeightsError`
    naming the model, the tag, the expected file and how to provide it.
    """
    import open_clip
    import open_clip.pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise BackboneWeightsError(f"{tag!r} is not an open_clip pretrained tag of {model}")
    found, expected = _find_cached(cfg)
    if found is not None:
        return found
    how = (
        f"Provide it with {WEIGHTS_ENV}=/path/to/file (keeps this tag's settings) or "
        f"BackboneConfig(weights='/path/to/file', quick_gelu={bool(cfg.get('quick_gelu', False))}), or put it in the cache "
        f"(open_clip.create_model({model!r}, pretrained={tag!r}) on a machine with network fills it)"
    )
    if not allow_download:
        raise BackboneWeightsError(
            f"weights {model}/{tag} are not in the local cache and downloading is off; expected "
            f"{' or '.join(expected)}. {how}, or allow the download "
            f"(allow_download=True or {ALLOW_DOWNLOAD_ENV}=1)."
        )
    try:
        path = oc_pretrained.download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001 - any network/hub failure means the same to the user
        raise BackboneWeightsError(
            f"could not download weights {model}/{tag} ({type(exc).__name__}: {exc}); expected "
            f"{' or '.join(expected)}. {how}."
        ) from exc
    if not path or not Path(path).is_file():
        raise BackboneWeightsError(f"download of weights {model}/{tag} gave no file; expected {' or '.join(expected)}. {how}.")
    return Path(path)


class Backbone(nn.Module):
    """A frozen open_clip ViT that maps images to patch-token maps of chosen blocks.

    Always in eval mode with gradients off; inference runs under ``torch.inference_mode`` and,
    on CUDA, bf16 autocast. Outputs are ordinary float32 tensors (not inference tensors), so
    they can feed a trainable head directly.
    """

    def __init__(
        self,
        config: BackboneConfig,
        device: str | torch.device = "auto",
        *,
        allow_download: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = resolve_spec(config)
        target = resolve_device(device)
        if allow_download is None:
            allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")
        self.weights_path: Path | None = self.spec.file
        if self.spec.weights_kind == "tag":
            assert self.spec.tag is not None
            self.weights_path = locate_pretrained(config.model, self.spec.tag, allow_download=allow_download)
        self.model = _build_model(self.spec, self.weights_path)
        self.model.to(target)
        self.model.requires_grad_(False)
        # Frozen: on CUDA the weights are cast to bf16 once instead of by autocast on every forward.
        cast_for_inference(self.model, target)
        super().train(False)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=target).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32, device=target).view(1, 3, 1, 1)
        self.register_buffer("_mean", mean, persistent=False)
        self.register_buffer("_std", std, persistent=False)
        self._indices = [i - 1 for i in self.spec.layers]
        self._tokenizer: Any = None

    # -- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model runs (follows ``.to(...)``)."""
        return self._mean.device

    @property
    def key(self) -> str:
        """Identifies the features: model, weights (tag, file hash or random+seed), size, blocks."""
        return self.spec.key

    @property
    def embed_dim(self) -> int:
        """Channels ``C`` of each feature map (the ViT width), the heads' input size."""
        return self.spec.width

    @property
    def joint_dim(self) -> int:
        """Size ``D`` of the joint image-text space (``encode_text``, ``patch_tokens_projected``)."""
        return self.spec.joint_dim

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of each feature map."""
        return self.spec.grid

    @property
    def num_layers(self) -> int:
        """How many blocks are tapped (the length of ``extract``'s list)."""
        return len(self.spec.layers)

    @property
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """Per-layer ``(C, h, w)`` of :meth:`extract`'s output (the same as a feature cache's)."""
        return [(self.embed_dim, *self.grid)] * self.num_layers

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.layers

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def provenance(self) -> dict[str, Any]:
        record = self.spec.provenance()
        if self.spec.weights_kind == "tag" and self.weights_path is not None:
            record["weights_path"] = str(self.weights_path)
        return record

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever a parent module asks: the encoder is frozen."""
        return super().train(False)

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB arrays -> normalized ``B x 3 x S x S`` float32 on the device.

        Each image is resized (bicubic, antialiased, no crop: maps must cover the whole image)
        to ``image_size`` and normalized with the weights' own mean/std. A uint8
        ``B x H x W x 3`` tensor (same-size images, e.g. a pinned batch from a DataLoader)
        is accepted too and copied to the device asynchronously.
        """
        if len(images) == 0:
            raise ValueError("Backbone.preprocess: got no images")
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[3] != 3 or images.dtype != torch.uint8:
                raise ValueError(
                    f"Backbone.preprocess: a batch tensor must be B x H x W x 3 uint8, got {images.dtype} {tuple(images.shape)}"
                )
        else:
            for i, img in enumerate(images):
                if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    desc = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                    raise ValueError(f"Backbone.preprocess: image {i} must be an H x W x 3 uint8 RGB array, got {desc}")
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            groups: list[Any] = [images]
        else:
            same = all(img.shape == images[0].shape for img in images)
            groups = [list(images)] if same else [[img] for img in images]
        out = []
        for group in groups:
            if isinstance(group, torch.Tensor):
                x = group
            else:
                x = torch.from_numpy(np.stack([np.ascontiguousarray(img) for img in group]))
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp_(0.0, 255.0)
            out.append(x)
        x = torch.cat(out) if len(out) > 1 else out[0]
        return ((x / 255.0 - self._mean) / self._std).contiguous()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.extract(x)

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Preprocessed ``B x 3 x S x S`` -> per tapped block a float32 ``B x C x h x w`` map."""
        x = self._check_input(x)
        with torch.inference_mode(), autocast(self.device):
            out = self.model.visual.forward_intermediates(
                x, indices=self._indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"
            )["image_intermediates"]
        return [t.to(torch.float32, copy=True) for t in out]

    def patch_tokens_projected(self, x: torch.Tensor) -> torch.Tensor:
        """Final-block patch tokens through ``ln_post`` and ``proj``, L2-normalized: ``B x (h*w) x D``.

        This is the joint image-text space, so a token can be compared with ``encode_text``
        (WinCLIP-style zero-shot maps).
        """
        x = self._check_input(x)
        visual = self.model.visual
        with torch.inference_mode(), autocast(self.device):
            tokens = visual.forward_intermediates(
                x, indices=[self.spec.depth - 1], intermediates_only=True, output_fmt="NLC"
            )["image_intermediates"][0]
            tokens = visual.ln_post(tokens) @ visual.proj
            tokens = F.normalize(tokens.float(), dim=-1)
        return tokens.clone()

    # -- text --------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalized ``T x D`` float32 embeddings in the joint space."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("Backbone.encode_text: expected a non-empty list of strings")
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.config.model)
        chunks = []
        for start in range(0, len(texts), _TEXT_BATCH):
            tokens = self._tokenizer(list(texts[start : start + _TEXT_BATCH])).to(self.device)
            with torch.inference_mode(), autocast(self.device):
                emb = self.model.encode_text(tokens)
                chunks.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(chunks).clone()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"Backbone expects a preprocessed B x 3 x {size} x {size} tensor (see preprocess), got {shape}"
            )
        return x.to(self.device, dtype=torch.float32, non_blocking=True)


# -- helpers -------------------------------------------------------------------------------------
def _check_layers(config: BackboneConfig, depth: int) -> tuple[int, ...]:
    if config.layers is None:
        return default_layers(depth)
    layers = config.layers
    if any(not 1 <= i <= depth for i in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
        raise BackboneError(
            f"BackboneConfig.layers={layers} is invalid for {config.model} ({depth} blocks): expected "
            f"strictly increasing 1-based block indices in 1..{depth}, e.g. {default_layers(depth)}"
        )
    return layers


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(_WEIGHT_SUFFIXES)
        or Path(value).exists()
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _hf_cache_dir() -> str | None:
    """The Hugging Face hub cache as the environment says now (the hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _find_cached(cfg: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """Look for a pretrained config's file in the HF hub cache, then open_clip's URL cache."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    expected: list[str] = []
    if cfg.get("file"):
        expected.append(str(cfg["file"]))
        if Path(cfg["file"]).is_file():
            return Path(cfg["file"]), expected
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        if not filename or filename == HF_WEIGHTS_NAME:
            names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        cache = _hf_cache_dir()
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip installs huggingface_hub
            try_to_load_from_cache = None
        alternatives = " or ".join(f"{repo}/{name}" for name in names)
        expected.append(f"{alternatives} in the Hugging Face cache ({cache or '~/.cache/huggingface/hub'})")
        for name in names:
            if try_to_load_from_cache is not None:
                hit = try_to_load_from_cache(repo, name, cache_dir=cache)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit), expected
    url = cfg.get("url", "")
    if url:
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        expected.append(f"{target} (from {url})")
        if target.is_file():
            return target, expected
    return None, expected


@contextlib.contextmanager
def _local_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block only: model init never disturbs the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_model(spec: BackboneSpec, weights_path: Path | None) -> nn.Module:
    """Create the open_clip model on CPU (seeded), then load the weights file, if any."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    with _local_rng(RANDOM_SEED):
        model = open_clip.create_model(
            spec.config.model,
            pretrained=None,
            precision="fp32",
            device="cpu",
            force_quick_gelu=spec.quick_gelu,
            force_image_size=spec.config.image_size,
            force_preprocess_cfg={"mean": spec.mean, "std": spec.std},
        )
    if not isinstance(model.visual, VisionTransformer):
        raise BackboneError(f"open_clip model {spec.config.model!r} did not build a VisionTransformer image tower")
    if weights_path is not None:
        _load_weights(model, weights_path, spec)
    model.eval()
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def _load_weights(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load a full CLIP checkpoint; position embeddings are resized by open_clip if needed."""
    import open_clip
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    try:
        if _is_torchscript(path):
            # OpenAI's original releases are TorchScript archives, which torch.load refuses
            # with weights_only=True; their tensors are read through torch.jit instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            state = {k: v for k, v in state.items() if k not in _JIT_EXTRA_KEYS}
            resize_pos_embed(state, model)
            resize_text_pos_embed(state, model)
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported with the file and model named
        raise BackboneWeightsError(
            f"could not load weights file {str(path)!r} into {spec.config.model} "
            f"({type(exc).__name__}: {str(exc)[:500]}); expected a full open_clip/CLIP checkpoint "
            "for this model (safetensors, a torch.save state dict or an OpenAI TorchScript archive)"
        ) from exc


__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "Backbone",
    "BackboneConfig",
    "BackboneError",
    "BackboneSpec",
    "BackboneWeightsError",
    "RANDOM_SEED",
    "TINY_BACKBONE",
    "TINY_MODEL",
    "WEIGHTS_ENV",
    "backbone_key",
    "default_layers",
    "file_sha256",
    "locate_pretrained",
    "register_model_configs",
    "resolve_spec",
]
