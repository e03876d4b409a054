"""Write files and folders so that a crash never leaves a half-written one under the final name.

Everything minqlora writes for later use (adapters, checkpoints, predictions, merged models) goes to
a temporary name beside its destination and is renamed into place once complete; rename is atomic
on one filesystem, so readers see the old version or the new one, never a mixture. Results get the
ordinary permissions of a new file (0666/0777 less the umask), not the private ones of a temporary.
No paper section. Checked by the interrupted-write tests in tests/test_checkpoint.py and
tests/test_infer_scripts.py.
"""
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest):
    """Yield a fresh temporary folder; on success it replaces `dest` (a folder), else it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():  # move the old one aside first: os.replace cannot overwrite a non-empty folder
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dest):
    """Yield a temporary file name beside `dest` for a writer that wants a path (e.g. safetensors'
    save_file); on success it is synced and renamed to `dest`, else removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, dest)


def save_safetensors(tensors: dict, dest, metadata: dict):
    """safetensors' save_file into `dest`, atomically. Its writer reports a failed write (a full disk) as a
    SafetensorError, raised here as the OSError it is: a command then reports it as a fault, in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    with atomic_path(dest) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise OSError(f"{dest}: {e}") from None


@contextlib.contextmanager
def atomic_file(dest, mode="w", encoding="utf-8"):
    """Yield an open temporary file; on success it replaces `dest`, else it is removed."""
    with atomic_path(dest) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
