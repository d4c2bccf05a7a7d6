"""Files that are whole or absent: atomic, durable writes that leave an unchanged file alone.

Every file a run or a table writes goes through `write_atomic`: the bytes go to a temporary file
in the same directory, which is flushed, fsynced and renamed over the target, and the directory is
fsynced so that the rename itself survives a crash. A reader (or a crash at any moment) sees the
old file or the new one, never a mix. A target that already holds exactly these bytes is not
touched at all, so that rebuilding a derived file does not change its modification time.
"""

from __future__ import annotations

import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open(path, 'w') would give a new file


def read_bytes(path: str) -> bytes | None:
    """The bytes of `path`, or None when it does not exist or cannot be read."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


def write_atomic(path: str, data: bytes | str) -> bool:
    """Replaces `path` by `data` (str is written as UTF-8) atomically and durably.

    Returns:
      True if the file was written, False if it already held exactly `data`.
    """
    if isinstance(data, str):
        data = data.encode('utf-8')
    if read_bytes(path) == data:
        return False
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp'
    )
    try:
        try:  # the old file's permissions, or those of a newly created file (mkstemp's are 0600)
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = _NEW_FILE_MODE
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    fsync_dir(directory)
    return True


def fsync_dir(directory: str) -> None:
    """Makes renames and creations in `directory` durable (where the platform allows it)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
