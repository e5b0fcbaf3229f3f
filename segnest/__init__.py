"""segnest: semantic segmentation with ResNeSt backbones and DeepLabV3 heads.

The public API mirrors the CLI::

    model = segnest.create_model("deeplabv3_resnest50", num_classes=150)
    segnest.list_models()
    segnest.load_pretrained(model, "resnest50-528c19ca.pth")
    predictor = segnest.load_model("runs/ade20k/best.pt")   # as `segnest predict` runs it
    labels = predictor("photo.jpg")
"""

import os
from typing import Any

# albumentations checks PyPI for a newer release on import; segnest never touches the
# network at run time, so switch that off before anything imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from segnest.errors import SegnestError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Predictor", "SegnestError", "create_model", "list_models", "load_model",
           "load_pretrained", "__version__"]

_LAZY = {
    "create_model": "segnest.models",
    "list_models": "segnest.models",
    "load_pretrained": "segnest.models",
    "load_model": "segnest.inference.predictor",
    "Predictor": "segnest.inference.predictor",
}


def __getattr__(name: str) -> Any:
    # Importing torch takes seconds; `segnest --help` and `--version` should not pay for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segnest' has no attribute {name!r}")
