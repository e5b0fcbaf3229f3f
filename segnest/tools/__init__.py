"""Commands built from the others: ``segnest bench`` and ``segnest demo``."""
