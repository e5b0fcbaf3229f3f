"""Detection and instance segmentation (Faster, Mask, Cascade, Cascade Mask R-CNN)."""
