"""The command line's layer above the library: flags, recipes and presets turned into the
typed settings the library takes (config.py)."""
