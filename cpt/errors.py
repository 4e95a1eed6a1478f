"""User-facing errors.

A :class:`CptError` is a problem with the user's input or environment that the user can
fix: a bad recipe field, a missing file, an unknown asset. The CLI prints it as a single
line (``error: <message>``) and exits with status 2, never with a traceback. Library code
raises it with a message that names the field or file and says how to fix it.
"""

from __future__ import annotations


class CptError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a multi-line message would break the "one line" contract.
        super().__init__(" ".join(str(message).split()))


class TrainingDivergedError(CptError):
    """The training loss became non-finite; the last good state is kept."""

    exit_code = 1
