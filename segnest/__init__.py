"""segnest: semantic segmentation with ResNeSt backbones and DeepLabV3 heads.

The public API mirrors the CLI::

    model = segnest.create_model("deeplabv3_resnest50", num_classes=150)
    segnest.list_models()
    segnest.load_pretrained(model, "resnest50-528c19ca.pth")
"""

import os

# albumentations checks PyPI for a newer release on import; segnest never touches the
# network at run time, so switch that off before anything imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from segnest.errors import SegnestError  # noqa: E402
from segnest.models import create_model, list_models  # noqa: E402
from segnest.models.weights import load_pretrained  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SegnestError", "create_model", "list_models", "load_pretrained", "__version__"]
