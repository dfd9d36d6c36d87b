"""User-facing errors.

Every mistake a user can make (bad scenario key, unknown GPU, malformed trace row, a model that
does not fit) raises :class:`FleetsimError` with a one-line message naming the file/line/field.
The CLI prints ``error: <message>`` and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class FleetsimError(Exception):
    """A problem with the user's input or configuration (exit code 2 in the CLI)."""

    exit_code = 2


class ConfigError(FleetsimError):
    """Invalid scenario / catalog / policy configuration."""


class TraceError(FleetsimError):
    """Invalid or unreadable workload trace."""


class DoesNotFitError(ConfigError):
    """A model / GPU / tensor-parallel combination that cannot serve (weights or KV do not fit)."""
