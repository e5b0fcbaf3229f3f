"""The two training commands and what they share: ``segnest train`` (segmentation.py),
``segnest pretrain`` (classification.py), one run protocol (run_state.py: resume,
checkpoints, stop requests, process set-up), losses, optimizer groups and schedules."""
