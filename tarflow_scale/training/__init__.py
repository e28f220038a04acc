"""Training: the per-worker DeepSpeed loop, the Ray Train launch, the DeepSpeed config, lr schedule and metrics."""
