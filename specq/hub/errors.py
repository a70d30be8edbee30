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


# Exit codes of the `specq` commands (scripts may rely on them):
#   0 success; 1 unexpected failure; 2 usage error (bad option, unknown mode);
#   3 checkpoint damaged / missing / not a specq checkpoint, or disk full while writing;
#   4 checkpoint from a newer specq format version; 5 Hub unreachable / repo or revision not found /
#   no permission; 6 export not possible for this checkpoint; 7 model could not be loaded (unknown id,
#   no network, unreadable file); 8 model cannot be transformed (unsupported architecture).
EXIT_USAGE = 2
EXIT_MODEL_LOAD = 7
EXIT_TRANSFORM = 8


def exit_code_for(e: BaseException) -> int:
    if isinstance(e, HubError):
        return e.exit_code
    if type(e).__name__ == "ModelLoadError":
        return EXIT_MODEL_LOAD
    return 1
