"""Dagma: a reproducible ML lab."""
