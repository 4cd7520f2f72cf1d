"""What both jobs share: data, flags, checkpoints, the run grid, robust accuracy and the report."""
