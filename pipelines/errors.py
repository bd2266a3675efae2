"""The error a stage raises for bad data; the caller turns it into a Reject, never a crash."""

from __future__ import annotations


class CleanError(ValueError):
    """Bad input found while reading or cleaning one modality of one sample.

    ``reason`` is a stable code (``image.truncated``, ``audio.non_finite``, ``text.invalid_utf8``)
    used to group rejects in reports; ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason
