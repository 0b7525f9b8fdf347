"""DataError: a data source, a tokenizer or prepared data cannot be used.

Its own module, below every data module that raises it, so none imports another to get it.
"""

from __future__ import annotations

from kconfig.errors import NamedError


class DataError(NamedError, ValueError):
    """A data source cannot be used; the message says what, where and what to do."""
