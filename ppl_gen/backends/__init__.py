"""Inference backends besides Pyro's own: the NumPyro mirror and its helpers."""
