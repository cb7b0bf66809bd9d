"""Errors and warnings of checkpoint I/O: one line that names the file and the tensor."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked (bad file, tensor, shape, dtype, config...)."""


class CheckpointWarning(UserWarning):
    """Something in a checkpoint was accepted but deserves a look (extra scale rows, unexpected tensors)."""
