"""Pruning methods, registered by name in ``fedprune.pruning.PRUNERS``."""
