"""The error a job spec or command-line argument that cannot work raises; the CLI exits 2 with its message."""


class SpecError(ValueError):
    """A job spec or CLI argument that cannot work; the message says what to fix."""
