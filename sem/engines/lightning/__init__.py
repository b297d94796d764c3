"""Thin Lightning adapters over the core policies: the engine builder (``build``), LightningModule,
callbacks, precision plugin, XPU accelerator, strategies. The only package that imports Lightning."""

from sem.engines.lightning.module import SEMLightningModule

__all__ = ["SEMLightningModule"]
