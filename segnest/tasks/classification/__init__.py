"""``segnest pretrain``: classification pretraining of a backbone (task.py)."""
