"""Language models in pure PyTorch: the SEM (``sem/``), the Transformer baseline (``transformer``),
what every model shares (``common``: loss, parameter groups) and text generation (``generate``)."""
