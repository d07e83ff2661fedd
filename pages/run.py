"""Run page: configure and start an evaluation, follow it, cancel it; or pick a cached run.

Inputs are checked as they change, with the same code the evaluation will use: the dataset
root through the reader (its ``DatasetError`` is shown as is), the backbone through
``resolve_spec`` and the local weight caches. The evaluation itself runs as a background job
(``dashboard/jobs.py``): the page stays usable, shows progress with time left, and Cancel
stops it at the next progress step with the finished categories kept.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import bootstrap, jobs, nav, state
from harmoniad import charts
from harmoniad.backbone import (
    ALLOW_DOWNLOAD_ENV,
    TINY_BACKBONE,
    BackboneConfig,
    BackboneError,
)
from harmoniad.data import (
    DATASETS,
    DatasetError,
    ensure_synthetic,
    list_categories,
    load_dataset,
)
from harmoniad.evaluate import EvalRequest
from harmoniad.methods import DEFAULT_METHODS, METHODS, build_method
from harmoniad.runtime.paths import cache_dir

JOB_KEY = "run_job_id"
DATASET_LABELS = {
    "mvtec": "MVTec AD",
    "visa": "VisA",
    "btad": "BTAD",
    "folder": "Folder (your own images, MVTec-like tree)",
    "synthetic": "Synthetic (generated, no download)",
}
KIND_LABELS = {"ablation": "ablation", "baseline": "baseline"}  # HarmoniAD itself needs no tag


@dataclass(frozen=True)
class Preset:
    label: str
    config: BackboneConfig | None  # None: custom


PRESETS: dict[str, Preset] = {
    "tiny": Preset("Tiny test backbone, random weights (offline; numbers are meaningless)", TINY_BACKBONE),
    "vitl336": Preset("CLIP ViT-L/14 at 336 px, OpenAI weights (the paper's setting)",
                      BackboneConfig(model="ViT-L-14-336", weights="openai", image_size=336)),
    "vitb16": Preset("CLIP ViT-B/16 at 224 px, OpenAI weights (faster)",
                     BackboneConfig(model="ViT-B-16", weights="openai", image_size=224)),
    "custom": Preset("Custom: any open_clip ViT, tag / local file / random", None),
}


# ---------------------------------------------------------------------- checks (cached)
@st.cache_data(show_spinner=False, ttl=30, max_entries=64)
def _categories(dataset: str, root: str) -> tuple[list[str], str | None]:
    """The dataset's categories at ``root``, or the reader's error message."""
    try:
        return list_categories(dataset, root), None
    except DatasetError as exc:
        return [], str(exc)
    except OSError as exc:
        return [], f"{root}: cannot be read ({exc})"


@st.cache_data(show_spinner=False, ttl=30, max_entries=64)
def _dataset_counts(dataset: str, root: str, categories: tuple[str, ...]) -> tuple[dict[str, int], str | None]:
    """Image counts of the chosen categories, read (and validated) by the dataset reader."""
    try:
        train = load_dataset(dataset, root, list(categories), split="train")
        test = load_dataset(dataset, root, list(categories), split="test")
    except DatasetError as exc:
        return {}, str(exc)
    except OSError as exc:
        return {}, f"{root}: cannot be read ({exc})"
    return {"train": len(train), "test": len(test), "defective": sum(s.label for s in test)}, None


@st.cache_data(show_spinner=False, max_entries=32)
def _check_backbone(config: BackboneConfig, allow_download: bool) -> tuple[str | None, str | None]:
    """(error, note) for a backbone config, without loading the model."""
    from harmoniad.backbone import locate_pretrained, resolve_spec

    try:
        spec = resolve_spec(config)
    except BackboneError as exc:
        return str(exc), None
    if spec.weights_kind == "tag" and spec.tag is not None:
        try:
            path = locate_pretrained(config.model, spec.tag, allow_download=False)
        except BackboneError as exc:
            if allow_download:
                return None, f"Weights are not cached yet and will be downloaded ({ALLOW_DOWNLOAD_ENV} is set)."
            return str(exc), None
        return None, f"Weights found: `{path}`."
    if spec.weights_kind == "file":
        return None, f"Weights file `{spec.file}` (sha256 {str(spec.file_sha256)[:12]}...)."
    return None, "Random weights: the run checks the pipeline; its numbers say nothing about the method."


# ---------------------------------------------------------------------- form pieces
def _default_root(dataset: str) -> str:
    return str(cache_dir() / "datasets" / "synthetic") if dataset == "synthetic" else ""


def _dataset_inputs() -> tuple[str, str, list[str], str | None]:
    """Dataset, root, categories and the first problem found (None when all is well)."""
    names = [n for n in DATASET_LABELS if n in DATASETS]
    c1, c2 = st.columns([1, 2])
    dataset = c1.selectbox("Dataset", names, index=names.index("synthetic"), format_func=DATASET_LABELS.__getitem__,
                           key="run_dataset", help="Synthetic needs no download; the others read your copy.")
    root_key = f"run_root_{dataset}"
    if root_key not in st.session_state:
        st.session_state[root_key] = _default_root(dataset)
    root = c2.text_input("Root folder", key=root_key, placeholder=f"e.g. ~/data/{dataset}",
                         help="The folder the dataset reader expects; checked as soon as you press Enter.").strip()
    st.caption(f"Expected layout: `{DATASETS[dataset].layout}`")
    if not root:
        st.info("Enter the dataset's root folder.")
        return dataset, root, [], "no root folder"
    found, error = _categories(dataset, str(Path(root).expanduser()))
    if error:
        st.error(error, icon=":material/folder_off:")
        here = Path(root).expanduser()
        if (dataset == "synthetic" and here == Path(_default_root(dataset))
                and st.button("Generate the synthetic dataset here", key="run_make_synthetic",
                              icon=":material/add_photo_alternate:")):
            _generate_synthetic(here)
        return dataset, root, [], error
    st.success(f"Found {len(found)} categories: {', '.join(found)}", icon=":material/folder_open:")
    cats_key = f"run_categories_{dataset}_{root}"
    categories = st.multiselect("Categories", found, default=found, key=cats_key,
                                help="The categories to evaluate (default: all found).")
    if not categories:
        st.warning("Choose at least one category.")
        return dataset, root, [], "no category"
    with st.spinner("Reading the dataset..."):
        counts, error = _dataset_counts(dataset, str(Path(root).expanduser()), tuple(categories))
    if error:
        st.error(error, icon=":material/folder_off:")
        return dataset, root, categories, error
    st.caption(f"{counts['train']} training images (normal), {counts['test']} test images "
               f"({counts['defective']} defective).")
    return dataset, root, categories, None


def _generate_synthetic(root: Path) -> None:
    bar = st.progress(0.0, text="Generating the synthetic dataset...")

    def progress(event) -> None:  # type: ignore[no-untyped-def]
        bar.progress(event.fraction, text=event.describe())

    ensure_synthetic(root, progress=progress)
    _categories.clear()
    _dataset_counts.clear()
    st.rerun()


def _method_inputs() -> tuple[list[str], str | None]:
    def label(name: str) -> str:
        spec = METHODS[name]
        kind = KIND_LABELS.get(spec.kind)
        return f"{spec.label} ({kind})" if kind else spec.label

    chosen = st.multiselect("Methods", list(METHODS), default=[m for m in DEFAULT_METHODS if m in METHODS],
                            format_func=label, key="run_methods")
    if chosen:
        st.caption("  \n".join(f"**{METHODS[n].label}**: {METHODS[n].description}" for n in chosen))
    if not chosen:
        st.warning("Choose at least one method.")
        return chosen, "no method"
    return chosen, None


def _backbone_inputs(methods: list[str]) -> tuple[BackboneConfig | None, str | None]:
    st.markdown("**Backbone and weights**")
    preset = st.selectbox("Backbone", list(PRESETS), format_func=lambda k: PRESETS[k].label, key="run_preset")
    chosen = PRESETS[preset].config
    if chosen is None:
        c1, c2, c3 = st.columns([2, 1, 1])
        model = c1.text_input("open_clip model", value="ViT-B-16", key="run_model",
                              help="An open_clip ViT name, e.g. ViT-L-14-336, ViT-B-16, or harmoniad-tiny.").strip()
        source = c2.radio("Weights", ["pretrained tag", "local file", "random"], key="run_weights_kind")
        size = c3.number_input("Image size (px)", min_value=32, max_value=1024, value=224, step=8, key="run_image_size")
        if source == "pretrained tag":
            weights = st.text_input("Pretrained tag", value="openai", key="run_tag",
                                    help="An open_clip tag of this model, e.g. openai or laion2b_s34b_b88k.").strip()
        elif source == "local file":
            weights = st.text_input("Weights file", key="run_weights_file", placeholder="/path/to/open_clip_model.safetensors",
                                    help="A state dict or safetensors file for this open_clip model.").strip()
            if weights and not Path(weights).expanduser().is_file():
                st.error(f"`{weights}`: no such file.")
                return None, "weights file missing"
            if not weights:
                st.info("Enter the path of the weights file.")
                return None, "no weights file"
            weights = str(Path(weights).expanduser())
        else:
            weights = "random"
        try:
            chosen = BackboneConfig(model=model or "?", weights=weights or "?", image_size=int(size))
        except BackboneError as exc:
            st.error(str(exc))
            return None, str(exc)
    else:
        st.caption(f"Model `{chosen.model}`, weights `{chosen.weights}`, {chosen.image_size} px input.")
    if methods and not any(_uses_backbone(m) for m in methods):
        st.caption("None of the chosen methods uses the backbone.")
        return chosen, None
    allow = os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")
    with st.spinner("Checking the backbone..."):
        error, note = _check_backbone(chosen, allow)
    if error:
        st.error(error, icon=":material/memory:")
        return None, error
    if chosen.weights == "random":
        st.warning(note or "", icon=":material/warning:")
    elif note:
        st.caption(note)
    return chosen, None


@st.cache_data(show_spinner=False)
def _uses_backbone(method: str) -> bool:
    """Whether the method reads CLIP features (building one is cheap: no weights are loaded)."""
    return bool(build_method(method).uses_backbone)


# ---------------------------------------------------------------------- job
def _start(request: EvalRequest) -> None:
    job_id = f"eval-{uuid.uuid4().hex[:8]}"
    title = f"Evaluation of {len(request.methods)} method(s) on {request.dataset}"
    job, _ = jobs.board().start(job_id, title, jobs.evaluation_work(request), state.store_path())
    st.session_state[JOB_KEY] = job.id


def _job_section() -> None:
    job = jobs.board().get(st.session_state.get(JOB_KEY))
    if job is None:
        return
    snap = job.snapshot()
    jobs.show_job(job, key="run")
    if snap.running:
        return
    done: list[str] = []
    if snap.run_ids:
        complete = set(state.list_runs(status="complete")["id"])
        done = [r for r in snap.run_ids if r in complete]
    flag = f"_run_job_selected_{job.id}"
    if done and not st.session_state.get(flag):
        st.session_state[flag] = True
        state.select_run(done[0])
    if done:
        st.caption("Open the results:")
        c1, c2, c3 = st.columns(3)
        with c1:
            nav.link(nav.OVERVIEW)
        with c2:
            nav.link(nav.COMPARE)
        with c3:
            nav.link(nav.INSPECT)
    if st.button("Clear", key="run_job_clear"):
        st.session_state.pop(JOB_KEY, None)
        st.rerun()


def _new_evaluation() -> None:
    dataset, root, categories, data_problem = _dataset_inputs()
    st.divider()
    methods, method_problem = _method_inputs()
    st.divider()
    backbone, backbone_problem = _backbone_inputs(methods)
    c1, c2, c3 = st.columns(3)
    resolution = int(c1.number_input("Evaluation resolution (px)", min_value=32, max_value=1024, value=256, step=32,
                                     key="run_resolution",
                                     help="Maps and ground-truth masks are compared at this size (default 256)."))
    seed = int(c2.number_input("Seed", min_value=0, value=0, step=1, key="run_seed"))
    device = c3.text_input("Device", value="auto", key="run_device",
                           help="auto (GPU when there is one), cpu, cuda, cuda:1, mps").strip() or "auto"
    st.caption("Resolution: the size at which anomaly maps and masks are compared for the pixel metrics.")

    job = jobs.board().get(st.session_state.get(JOB_KEY))
    busy = job is not None and job.running
    problems = [p for p in (data_problem, method_problem, backbone_problem) if p]
    others = [j for j in jobs.board().running() if job is None or j.id != job.id]
    if others:
        st.caption(f"Also running in this server: {', '.join(j.title for j in others)} (they share the CPU/GPU).")
    start = st.button("Start evaluation", type="primary", disabled=bool(problems) or busy, key="run_start",
                      icon=":material/play_arrow:",
                      help="Runs in the background; you can keep using the dashboard." if not problems
                      else "Fix the problems above first.")
    if start and backbone is not None:
        request = EvalRequest(dataset=dataset, root=str(Path(root).expanduser()), methods=tuple(methods),
                              categories=tuple(categories), backbone=backbone, resolution=resolution,
                              seed=seed, device=device)
        _start(request)
        st.rerun()
    _job_section()


def _cached_runs() -> None:
    st.caption("Every complete run is stored and reloads instantly; picking one here selects it on every page.")
    info = state.run_picker("Cached run", key="run_cached_picker")
    if info is None:
        bootstrap.demo_button(state.get_store(), key="run_demo")
        return
    state.weights_banner(info)
    categories = ", ".join(info.categories)
    backbone = "none (pixel space)" if info.backbone is None else f"{info.backbone.get('model')} ({info.backbone.get('weights')})"
    st.markdown(
        f"**{charts.method_label(info.method)}** on **{info.dataset}** ({categories}) · backbone {backbone} · "
        f"resolution {info.resolution} · started {info.created[:16].replace('T', ' ')} · status {info.status}"
    )
    metrics = state.run_metrics(info)
    ok = metrics[metrics["status"] == "ok"]
    if len(ok):
        means = {charts.METRIC_LABELS[m]: ok[m].mean() * 100.0 for m in charts.METRIC_LABELS}
        st.dataframe(pd.DataFrame([means]).style.format("{:.1f}", na_rep="–"), hide_index=True, width="stretch")
        st.caption("Means over the run's categories, in percent.")
    c1, c2, c3, c4 = st.columns(4)
    for column, name in zip((c1, c2, c3, c4), (nav.COMPARE, nav.INSPECT, nav.FAILURES, nav.EXPORT)):
        with column:
            nav.link(name)
    st.divider()
    bootstrap.demo_button(state.get_store(), key="run_demo")


def main() -> None:
    st.title("Run")
    st.caption("Evaluate methods on a dataset, or load a run from the cache.")
    new, cached = st.tabs(["New evaluation", "Load a cached run"])
    with new:
        _new_evaluation()
    with cached:
        _cached_runs()


main()
