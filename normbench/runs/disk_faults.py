"""Faults of the machine rather than the config -- a full disk, a read-only or forbidden directory -- turned
into one line naming the cause and the fix (``RunEnvironmentError``), checked before a run is built and
recognized when a write fails mid-run.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


class RunEnvironmentError(RuntimeError):
    """Something outside the config stops the run (disk full, a read-only directory); one line with the fix."""


PROBE_BYTES = 16 * 1024  # a few of the small files a run writes before its first checkpoint


def check_writable(directory: Path, setting: str = "results_dir") -> None:
    """Fail before anything is built if `directory` cannot be created or written (Hydra's own output directory
    lives under it too). The probe writes and syncs PROBE_BYTES: an empty file still fits on a full disk."""
    directory = Path(directory)
    probe = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunEnvironmentError(
                f"disk full in {directory} ({err.strerror}); free space on that file system or set {setting}= "
                "to another one"
            ) from None
        raise RunEnvironmentError(
            f"{setting}={directory} is not writable ({err.strerror or err}); choose a writable directory with "
            f"{setting}=DIR"
        ) from None
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)


def environment_cause(err: BaseException) -> OSError | None:
    """The OSError behind an exception (torch.save reports a full disk as a RuntimeError chained to it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return err
        err = err.__cause__ or err.__context__
    return None


def describe_environment_error(err: BaseException, directory: Path) -> str | None:
    """One line for a disk-full / read-only / permission fault while writing the run, else None."""
    cause = environment_cause(err)
    if cause is None and "write" in str(err).lower():
        try:  # torch's zip writer sometimes drops the errno; a full disk is then read off the file system
            if shutil.disk_usage(directory).free < 1 << 20:
                cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    if cause is None:
        return None
    where = f" writing {cause.filename}" if cause.filename else f" in {directory}"
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full{where} ({cause.strerror}); free space on that file system or set results_dir= to "
            f"another one, then rerun the same command to resume"
        )
    return f"cannot write{where} ({cause.strerror}); make results_dir writable or choose another with results_dir=DIR"
