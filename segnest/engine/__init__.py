"""Engine: training loops, inference strategies, metrics, checkpoints and visualization."""
