"""Training: the run (train), one epoch and augmentation (epoch), how long and when to stop (schedule),
resumable checkpoints (checkpoint), devices and DDP (distributed)."""
