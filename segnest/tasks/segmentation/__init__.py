"""``segnest train``: semantic segmentation (task.py), its losses, class weights and the
presets derived from the data and the machine."""
