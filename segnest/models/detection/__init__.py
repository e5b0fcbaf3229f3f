"""Detection and instance segmentation: Faster, Mask, Cascade and Cascade Mask R-CNN on
ResNeSt-FPN (backbone.py: trunk + FPN; heads.py: RoIAlign, RPN, RoI heads, cascade;
rcnn.py: settings, recipes and the builder)."""

from segnest.models.detection.rcnn import (
    ARCHITECTURES,
    RCNN,
    RECIPES,
    RCNNSettings,
    build_rcnn,
)

__all__ = ["ARCHITECTURES", "RCNN", "RECIPES", "RCNNSettings", "build_rcnn"]
