"""Sweeps: code snapshots and ``caitlab-sweep``. The launchers are Hydra plugins, which Hydra
loads only from the ``hydra_plugins`` package: ``hydra_plugins/caitlab_launcher``."""
