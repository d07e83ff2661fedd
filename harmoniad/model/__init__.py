"""The HarmoniAD network: frequency split, FSAM (high band), GSCM (low band), fusion and decoder."""

from harmoniad.model.network import (
    BandHead,
    GatedFusion,
    GridMaps,
    HarmoniAD,
    LayerInput,
    Losses,
    ModelConfig,
    ModelOutput,
    cosine_distance,
    parameter_counts,
    relative_band_distance,
    split_reconstruction,
)

__all__ = [
    "BandHead",
    "GatedFusion",
    "GridMaps",
    "HarmoniAD",
    "LayerInput",
    "Losses",
    "ModelConfig",
    "ModelOutput",
    "cosine_distance",
    "parameter_counts",
    "relative_band_distance",
    "split_reconstruction",
]
