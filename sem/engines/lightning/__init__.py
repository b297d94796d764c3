"""Thin Lightning adapters over the core policies: LightningModule, callbacks, precision plugin,
XPU accelerator. The only place (with sem/run.py) that imports Lightning."""
