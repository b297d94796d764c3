"""One module per config group: its schemas (``sem.config.store`` registers them; ``conf/<group>/``
options extend them) and its checks (``sem.config.validate`` lists them), side by side."""
