"""One base for every error a user of fedcare can see.

`FedcareError` carries the process exit code and a message that reads as one line (naming the
file, field, line or flag). The command line catches it in one place (`cli.main`): the user
sees `fedcare: error: <message>` on stderr and the exit code, never a traceback. Each package
defines its own subclasses next to the code that raises them; the two every party needs live
here.
"""

from __future__ import annotations


class FedcareError(Exception):
    """A failure the user can act on: one line of text and the exit code of the command."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def line(self) -> str:
        """The message as one line (continuation lines joined)."""
        text = " ".join(part.strip() for part in str(self).splitlines() if part.strip())
        return text or type(self).__name__


class StudyConfigError(FedcareError, ValueError):
    """A study file (or a run's override of it) is invalid; the message names the file and the field."""


class KeyMaterialError(FedcareError, ValueError):
    """A key or certificate file is missing, malformed, or has unsafe permissions."""
