"""The one exception type for bad input.

Every check of user input (configs, paths, checkpoints) raises `HarnessError` with a single
line that names the offending key or file and what is allowed. The CLI prints it as
`harness: error: <message>` and exits with status 2, without a traceback.
"""


class HarnessError(Exception):
    """Bad input, reported as one line and exit status 2."""


def require(condition: bool, message: str) -> None:
    """Raise `HarnessError(message)` unless `condition` holds."""
    if not condition:
        raise HarnessError(message)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can run to pages)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
