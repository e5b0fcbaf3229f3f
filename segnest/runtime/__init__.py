"""The process around the model: checkpoint files and atomic writes, torchrun and
synchronized BatchNorm, device choice, ``torch.compile``. Imports nothing of segnest but
``segnest.errors``; every other layer builds on it."""
