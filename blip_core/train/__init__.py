"""Training: optimizer and schedules, the training loop, checkpoints and resume, distributed helpers."""
