"""The tasks trained on the engine (:mod:`segnest.engine`), one folder each: its data,
model, step, validation and the settings of its own."""
