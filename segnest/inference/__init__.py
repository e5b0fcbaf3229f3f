"""From a trained model to answers: inference strategies and their settings (whole, sliding
window, multi-scale + flip), evaluation and its metrics, ``segnest predict``, ``segnest
export`` and the pictures (coloured masks, panels). Builds on models, data and runtime."""
