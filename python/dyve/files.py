"""Writing files so that a reader never sees a half-written one."""
import contextlib
import os
import tempfile

from dyve.errors import InputError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`,
    when it fails the temporary file is removed and `path` is untouched. For writers
    that want a file name (Caffe's Net.save, matplotlib's savefig)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path, data):
    """Write text or bytes to `path` through a temporary file and os.replace."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def ensure_writable_dir(path, what="--out-dir"):
    """Create `path` if needed and prove a file can be written there, before any long run
    (an unwritable output folder must not be found only at the end)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise InputError(f"{what}: cannot write to {path}: {error.strerror or error}") \
            from None
    return path


def remove_if_present(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
