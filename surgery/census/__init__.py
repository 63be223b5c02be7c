"""Diagnose a whole fact set and tabulate the verdicts."""
