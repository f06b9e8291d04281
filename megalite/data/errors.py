"""The data package's one error type."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be prepared or read; the message is one line that names the culprit."""
