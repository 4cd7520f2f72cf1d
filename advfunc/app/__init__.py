"""The command-line application: data, the training loop, evaluation, word attacks, checkpoints, reports."""
