"""Baselines trained and measured like SHARCS: early exit (DeeBERT, PABEE)."""
