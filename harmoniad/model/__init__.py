"""The HarmoniAD network: target normalisation, frequency split, FSAM (high band), GSCM (low band), fusion."""

from harmoniad.model.network import (
    Branch,
    GridMaps,
    HarmoniAD,
    Losses,
    ModelConfig,
    ModelOutput,
    Normaliser,
    band_loss,
    parameter_counts,
    position_distance,
    token_noise,
)

__all__ = [
    "Branch",
    "GridMaps",
    "HarmoniAD",
    "Losses",
    "ModelConfig",
    "ModelOutput",
    "Normaliser",
    "band_loss",
    "parameter_counts",
    "position_distance",
    "token_noise",
]
