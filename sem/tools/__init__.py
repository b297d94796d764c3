"""What a user does with a checkpoint, from the command line: ``evaluate`` (held-out or any corpus),
``sample`` (text), ``export`` (safetensors + config); ``entries`` is what the three share (usage errors,
console logging, the device, loading a checkpoint as user input). ``sem.load`` is
``sem.training.restore.load``: the run's own sample stage uses it too."""
