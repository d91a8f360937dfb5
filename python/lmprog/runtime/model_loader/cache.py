"""The on-disk cache of converted model files, and how it is written safely.

Layout under `cache_dir()` ($LMPROG_CACHE_DIR, else ~/.cache/lmprog):

    configs/<key>.json                      HF config derived from a GGUF's metadata
    tokenizers/<key>/                       fast tokenizer converted from a GGUF (save_pretrained)
    weights/<key>-<dtype>.safetensors       dequantized GGUF weights, HF names, in that dtype

`<key>` names the GGUF file by a hash of its contents (see `file_key`), so a renamed or copied
file hits the cache and an edited file misses it. Nothing here is ever updated in place: every
entry is written under a temporary name in the same folder and then renamed into place, which is
atomic on POSIX. Two processes that convert the same file at once (the API process and the
scheduler both start a tokenizer) therefore never see a half-written entry; at worst both do the
work and the last rename wins, with identical contents. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; atomic renames alone keep the cache correct.
    fcntl = None

# Bump when the conversion changes (tensor naming, config fields), so old entries are not reused.
CACHE_FORMAT = 1

_HASH_CHUNK = 1 << 22


def cache_dir() -> pathlib.Path:
    """The cache root: $LMPROG_CACHE_DIR if set, else ~/.cache/lmprog (read on every call)."""
    root = os.environ.get("LMPROG_CACHE_DIR")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "lmprog"


def file_key(path: str | os.PathLike[str]) -> str:
    """A cache key for a file: the first 16 hex digits of its SHA-256, plus the cache format.

    Hashing a 100 MB GGUF takes ~0.3 s; the result is memoized in-process per (path, size, mtime).
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    return _content_key(real, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _content_key(real_path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(real_path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"{digest.hexdigest()[:16]}-v{CACHE_FORMAT}"


def temp_path_beside(final: pathlib.Path) -> pathlib.Path:
    """A fresh, unique temporary file name in `final`'s folder (so the rename stays atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it private; cache entries are plain readable files
    return pathlib.Path(name)


def atomic_write_text(final: pathlib.Path, text: str) -> None:
    """Write `text` to `final` via a temporary file and os.replace."""
    tmp = temp_path_beside(final)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(final: pathlib.Path, fill: Callable[[pathlib.Path], None]) -> None:
    """Create the folder `final` atomically: `fill` writes a temporary folder that is renamed.

    A folder cannot replace a non-empty folder, so if another process published `final` first,
    ours is discarded and theirs (same contents) is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        fill(tmp)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if missing).

    Used only to avoid duplicate work (two processes converting the same tokenizer at once);
    correctness never depends on it. The OS releases the lock if the holder dies. It is not
    reentrant: never take it twice in one process.
    """
    if fcntl is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
