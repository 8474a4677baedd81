"""bnexp: reproduce and extend the classic Batch Normalization experiments."""

__version__ = "0.1.0"
