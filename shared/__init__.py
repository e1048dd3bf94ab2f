"""What the coordinator and the workers both need, and nothing else."""
