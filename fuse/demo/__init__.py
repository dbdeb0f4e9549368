"""The demo: a synthetic data set in the ISIC 2024 layout (`synthetic`) and the whole pipeline on
it (`run`, behind `invoke demo`)."""

from fuse.demo.run import run_demo

__all__ = ["run_demo"]
