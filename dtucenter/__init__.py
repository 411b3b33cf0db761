"""dtucenter: a data center for industrial DTUs."""

__version__ = "0.2.0.dev0"
