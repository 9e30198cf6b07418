"""The one exception type for mistakes a user can make (config, data, paths, world size)."""


class UserError(Exception):
    """A problem the user can fix; the message names the field or file and the fix."""


class ResumeMismatch(UserError):
    """A checkpoint that loads fine but belongs to another job (other data or data order): falling back to an older
    checkpoint of the same run cannot help, so resume=auto stops with this instead."""


class CheckpointNotLoadable(UserError):
    """A checkpoint this process cannot use now, though it may well be intact: a format newer than this version
    reads, or files this rank cannot read (an I/O error, a file not visible on this node yet). resume=auto stops with
    this rather than falling back past the checkpoint and setting it aside as damaged (its progress lost)."""


class StorageUnreadable(CheckpointNotLoadable):
    """Checkpoint files the storage cannot give now (an I/O error such as a stale NFS handle, a file not visible on
    every node yet): a later start may read them. Under torchrun the stop is not recorded in no_restart.json, so
    torchrun's restarts (MAX_RESTARTS) try again instead of ending the job as for a mistake in its settings."""
