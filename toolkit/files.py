"""Files that are never half-written: atomic writes, content hashes, exclusive locks on output directories."""
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def atomic_write(path, write, mode="wb"):
    """write(file object) into a temporary file beside `path`, fsync, then rename over `path`.

    The file gets the permissions a plain open() would give it (0666 less the umask): mkstemp's 0600 would
    leave a trained student unreadable to another user or a container with another uid."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    atomic_write(path, lambda f: f.write(text), mode="w")


def file_sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def exclusive_lock(path, wait: bool = False, what: str | None = None):
    """Advisory exclusive lock on the file `path` for the duration of the block.

    wait=False: a second holder is refused at once with a one-line error naming `what` (an output directory
    two runs must not share); wait=True: it waits for the first (a cache entry the first is building)."""
    path = Path(path)
    f = open(path, "a")  # noqa: SIM115 - closed below
    try:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError:
                raise ValueError(f"{what or path.parent} is being written by another process; wait for it or "
                                 "choose another directory") from None
        yield
    finally:
        f.close()

