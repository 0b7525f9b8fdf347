"""CheckpointError: a checkpoint cannot be written or used.

Its own module at the lowest layer that reads checkpoints (the sharded folders of parallel/untrusted.py),
so train/checkpoint.py and parallel/ raise the same error without an upward import.
"""

from __future__ import annotations

from kconfig.errors import NamedError


class CheckpointError(NamedError):
    """A checkpoint cannot be written or used; the message says what to do."""
