"""sem: train the Signal-Entropic Model with Hydra + Lightning; ``sem.load(path)`` rebuilds a trained model."""


def load(path, device="cpu"):  # noqa: ANN001, ANN201 - lazy: importing sem must stay cheap
    """``(model, cfg)`` from a checkpoint file or an exported directory (``sem.training.restore.load``)."""
    from sem.training.restore import load as _load

    return _load(path, device)
