"""Small filesystem steps that keep outputs whole: a directory appears complete or not at all."""

import errno
import os
import shutil
import uuid

from qwen2_dist.errors import UserError


def replace_dir(tmp: str, final: str) -> None:
    """Move a fully written directory `tmp` to `final`, replacing whatever was there in one rename."""
    if os.path.exists(final):
        # Move the old one aside first so the step that publishes the new one is a single rename.
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


class OutputTaken(UserError):
    """publish_dir's error: another output took the path while this one was written; this one is kept."""


def publish_dir(tmp: str, final: str) -> None:
    """Rename a fully written directory `tmp` to `final`, which new_output_dir found absent or empty: OutputTaken,
    naming both and leaving both as they are, when something else has been written there since."""
    try:
        # Unlike replace_dir, never moves anything aside: a rename onto a non-empty directory fails on Linux.
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise OutputTaken(f"{final}: was written by something else (another export to the same path?) while this "
                          f"output was being written, and is left as it is; this output is complete in {tmp}: "
                          f"check {final}, then move this one to a path of its own (mv {tmp} NEW_PATH)") from None


def fsync_path(path: str) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask sets one to read it, which a
    thread creating a file at that moment would get)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str) -> None:
    """Give a file the mode open() would have (0666 less the umask): safetensors' save_file writes 0600, which other
    users of a shared cluster cannot read, where every other file of the output is 0644 under the usual umask."""
    os.chmod(path, 0o666 & ~process_umask())


def write_atomic(path: str, text: str) -> None:
    """Write a small file whole or not at all: to a temporary sibling, flushed to disk, then renamed over path."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reads_in_place(path: str, split: str) -> bool:
    """Whether the loader reads a data source's split where it lies (a local, writable directory: streaming writes
    decompressed shards beside the compressed ones) rather than through a cache (remote, or read-only local)."""
    return "://" not in path and os.access(os.path.join(os.path.abspath(os.path.expanduser(path)), split), os.W_OK)


def check_writable_dir(path: str, what: str, fix: str) -> None:
    """UserError, naming `what` (e.g. run_dir=PATH) and ending with `fix`, when a directory cannot be made or written
    at path: it is a file, or lies under one, or the nearest directory that exists on the way to it cannot be written
    by this process. Nothing is created. Otherwise the first write there failed with a traceback: after the launch,
    in every rank, or after hours of work (a checkpoint read for its checksums before its export was written)."""
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = ("is a file, not a directory" if probe == os.path.abspath(os.path.expanduser(path))
                 else f"lies under the file {probe}")
        raise UserError(f"{what}: {where}; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {probe} cannot be written by this user; {fix}")


def new_output_dir(path: str, fix: str) -> str:
    """The real path of an output directory to be written beside it and renamed into its place (publish_dir;
    replace_dir for a checkpoint): UserError, ending with `fix`, unless it does not exist or is an empty directory
    that a rename can replace. A symlink is followed (the rename replaces its target, not the link); a mount point (a
    volume mounted there) is refused, as a rename cannot replace it and the output would first be written to the
    filesystem above it."""
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.exists(real):
        check_writable_dir(real, path, fix)
        return real
    if not os.path.isdir(real) or os.listdir(real):
        raise UserError(f"{path}: exists and is not an empty directory; {fix}")
    if os.path.ismount(real):
        raise UserError(f"{path}: is a mount point; the output is written beside its directory and renamed into its "
                        f"place, which a mount point cannot take: name a new directory inside it, e.g. "
                        f"{os.path.join(path, 'model')}")
    return real
