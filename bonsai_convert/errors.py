"""Error classes of bonsai-convert; each maps to one documented exit code (README, "Exit codes")."""

from __future__ import annotations


class BonsaiError(Exception):
    """An expected failure: printed as one line `error: <message>`, never with a traceback unless --debug."""

    exit_code = 1


class UsageError(BonsaiError):
    """Bad command-line arguments or an option combination that cannot work."""

    exit_code = 2


class InputError(BonsaiError):
    """A source checkpoint or bundle that is malformed, hostile, or not an exact binary/ternary Klein model."""

    exit_code = 3


class OutputError(BonsaiError):
    """The output cannot be written: it exists without --force, the disk is full, permissions."""

    exit_code = 4


class VerifyFailed(BonsaiError):
    """verify ran and at least one check failed."""

    exit_code = 5


class FitError(BonsaiError):
    """The bundle does not fit the device profile's memory budget (use --force to write it anyway)."""

    exit_code = 6


class RemoteError(BonsaiError):
    """The Hugging Face Hub refused, failed, or holds different bytes than the bundle."""

    exit_code = 7
