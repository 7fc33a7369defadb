"""Errors Loupe raises for bad input.

Every user-facing problem (a bad path, a config value we do not support, tokens that
disagree with image features) is a `LoupeError`: the CLI prints its message and exits
with status 2 instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class LoupeError(ValueError):
    """Bad input, with a message that names the offending value."""


class CheckpointError(LoupeError):
    """A checkpoint folder that cannot be loaded as asked."""


class ConfigError(LoupeError):
    """A config field whose value Loupe does not support."""


class Interrupted(LoupeError):
    """Ctrl-C during training: the message says where the run can resume from."""


def preview(items: list[str], limit: int = 10) -> str:
    """`a, b, c, ... (N in all)`: the first `limit` items and a count, for error messages."""
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else f" ({len(items)} in all)"
    return shown + more
