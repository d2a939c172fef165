"""Failures a user sees as one line: the CLI maps each to its exit status."""

from __future__ import annotations


class RunFailed(Exception):
    """A run could not go on (exit status 1); the message is one line for the user."""


class RunRefused(RunFailed):
    """A run was not started because another one is live on the scheduler (exit 2)."""


class ReconfigureRefused(RunFailed):
    """A live reconfiguration could not apply; the run goes on unchanged (exit 2)."""
