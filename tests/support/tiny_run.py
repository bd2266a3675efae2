"""The settings of the tiny training runs the trainer's tests make: feature widths of their synthetic data and
the flags of a model small enough to train in a second."""

DIMS = {"text": 12, "image": 10, "audio": 6}
TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--decoder-layers", "1", "--embed-dim", "8",
        "--batch-size", "8", "--no-progress", "--warmup-steps", "4", "--lr", "3e-3"]
