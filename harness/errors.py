"""The error 'make eval' raises for what the user can fix: a task, its dataset, its text, the run."""

from kconfig.errors import NamedError


class EvalError(NamedError):
    """An evaluation that cannot run as configured: says what, where and what to do."""
