"""Errors of the hub layer. Each names the problem and the fix; the CLI maps them to exit codes."""

from __future__ import annotations


class HubError(RuntimeError):
    """Base class; `exit_code` is what the `specq` command exits with."""

    exit_code = 1


class CheckpointError(HubError):
    """A checkpoint directory is missing files, has a corrupt shard, or is not a specq checkpoint."""

    exit_code = 3


class FormatVersionError(CheckpointError):
    """The checkpoint was written by a newer specq (a higher format version) than this one reads."""

    exit_code = 4


class HubAccessError(HubError):
    """The Hub could not be reached, the repo or revision does not exist, or the token may not write."""

    exit_code = 5


class ExportError(HubError):
    """A checkpoint cannot be exported in the requested format (the message says why and what to do)."""

    exit_code = 6
