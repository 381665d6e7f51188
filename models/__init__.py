"""Model files: one generative model per file, runnable with python -m inference.svi."""
