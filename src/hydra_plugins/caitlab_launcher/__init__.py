"""caitlab's sweep-aware submitit launchers, where Hydra looks for plugins."""
