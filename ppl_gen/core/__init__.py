"""The core: the model-file protocol, the run pipeline, the training step, the run folder, posterior files, plots, device and seed."""
