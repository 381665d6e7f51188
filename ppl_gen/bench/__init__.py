"""Benchmarks: entry points (``python -m ppl_gen.bench.vae NAME``) that time the project's paths
against a baseline measured in the same process. They may import models/ and inference/;
nothing else in ppl_gen imports them."""
