"""Synthetic tasks with exact verifiers (the embedded default run uses `arithmetic`)."""
