"""Training one run: the Lightning module, its callbacks, loggers and preemption handling."""
