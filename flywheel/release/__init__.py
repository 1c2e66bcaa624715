"""After the pipeline: the model registry, the serving image, and health-gated deployment."""
