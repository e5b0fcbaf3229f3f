"""The models: ResNeSt backbones (resnest.py, Split-Attention in splat.py), DeepLabV3
(deeplabv3.py), BN folding (fuse.py), the pixel ops that follow DeepLabV3's logits
(pixelwise.py), weight loading (weights.py) and the name -> builder table (factory.py)."""

from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.factory import create_model, list_models, model_from_checkpoint
from segnest.models.resnest import RESNEST_VARIANTS, ResNeSt
from segnest.models.weights import load_pretrained

__all__ = ["DeepLabV3", "RESNEST_VARIANTS", "ResNeSt", "create_model", "list_models",
           "load_pretrained", "model_from_checkpoint"]
