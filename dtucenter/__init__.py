"""dtucenter: a data center for industrial DTUs."""

__version__ = "0.1.0"
