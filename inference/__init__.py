"""Entry points: ``python -m inference.svi`` (one run) and, later, ``inference.compare``."""
