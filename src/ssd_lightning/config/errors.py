"""The errors a person is shown as one message (``config.cli``: no traceback, exit status 2):
``ConfigError`` for every config mistake (its message names the key and the allowed values), and
the bases that errors of the data and of a user's files derive from, so that the one exit path
knows them without importing the packages that raise them."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


class DataError(Exception):
    """A dataset that cannot be used as it is: files that do not match the committed manifest,
    an image or mask that cannot be read, an archive that cannot be fetched. Shown as
    "Data error: <message naming the file>"."""


class UserFileError(Exception):
    """A file a person gave (a photo, a model file) that is missing or cannot be read; the
    message names it."""


class MissingDependencyError(ImportError):
    """An optional package (a pip extra) that the requested feature needs is not installed; the
    message names the package and the install command."""


class ExportCheckError(RuntimeError):
    """An exported model whose runtime results differ from the PyTorch model's (the message
    says how much and where the files are)."""


class RunFailed(RuntimeError):
    """A training run that did not end well although its config was fine (e.g. it ended with
    non-finite weights): one message, exit status 1, the job FAILED."""


class RunInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an Exception
    """A training run stopped by SIGTERM / SIGINT after saving its state. A BaseException, like
    KeyboardInterrupt, so nothing on the way out mistakes it for a failed job: a sweep stops
    instead of going on with the next job. Exit status 128 + the signal number (143 / 130)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class ToolParser(argparse.ArgumentParser):
    """The argparse tools' parser: a mistake on the command line is a ``ConfigError``, so it ends
    like every other one (``config.cli``: one line, exit status 2), not with argparse's usage
    block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (--help lists the options)")
