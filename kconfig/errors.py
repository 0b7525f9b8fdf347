"""The base of every error this tool raises on purpose.

A NamedError's message already says what was wrong, where (file:line or CONFIG_ symbol) and what to
do, so the command line and the trainer show the message alone and keep any traceback in the log.
A leaf module: anything may import it without pulling in torch.
"""


class NamedError(Exception):
    """Raised on purpose, with a message that names the problem, its place and the fix."""


class ConfigError(NamedError):
    """One or more configuration assignments or rules did not hold. ``str()`` lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
