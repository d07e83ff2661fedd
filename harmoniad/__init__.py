"""HarmoniAD: frequency-guided dual-branch anomaly detection on frozen CLIP features."""

__version__ = "0.1.0"
