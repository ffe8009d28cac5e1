"""normbench: reproduce and compare normalization layers on equal terms."""

__version__ = "0.1.0"
