"""Files under a workdir or an output directory, on a local disk or an object store.

Every path the project writes under a workdir goes through `etils.epath` (as Orbax's do), so a
workdir may be a local directory, `gs://bucket/run` or `s3://bucket/run`. Object stores have
no appends, renames of directories are copies, and an object appears whole when its upload
completes; the helpers here give each file kind the semantics it needs on both.
A leaf module: it imports nothing of lm.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from collections.abc import Callable

from etils import epath

PathLike = str | os.PathLike | epath.Path
REMOTE_SCHEMES = ("gs://", "s3://")


def as_path(path: PathLike) -> epath.Path:
    """An epath.Path for a local path or a gs:// / s3:// URL."""
    if is_remote(path):
        _fresh_listings()
    return epath.Path(path)


@functools.cache
def _fresh_listings() -> None:
    """fsspec caches directory listings per process, so a process that listed a bucket keeps
    seeing that listing after another process (a training run, another host) wrote to it:
    Orbax then misses new checkpoints (seen here: a reader listed steps [6, 9] after a run had
    saved 12 and 15). Listings of object stores are read fresh. fsspec's per-protocol defaults
    are its documented configuration (`fsspec.config.conf`); set once, before any gs:// or s3://
    filesystem is made by epath."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path: PathLike) -> bool:
    """A gs:// or s3:// URL (as a string or an epath.Path; a pathlib.Path cannot hold one)."""
    return str(path).startswith(REMOTE_SCHEMES)


def write_atomic(path: PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Writes the whole file so that a reader (or a rerun after a kill) sees the old content
    or the new one, never a part. Locally: a temporary file beside it, flushed to disk, then
    renamed over it. On an object store an object appears only when its upload completes.
    ``data`` may be a function that writes the file at the local path it is given (for
    writers that take a path, such as safetensors')."""
    path = as_path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        if callable(data):
            with tempfile.TemporaryDirectory() as scratch:
                data(os.path.join(scratch, path.name))
                data = pathlib.Path(scratch, path.name).read_bytes()
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"" if callable(data) else data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as f:  # durable before it takes the name
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_exclusive(path: PathLike, data: bytes | str) -> bool:
    """Creates the file whole if no file has that name, atomically against any other writer:
    True if this call created it, False if it existed. Locally a finished temporary file is
    hard-linked to the name (a link fails if the name exists); on a bucket the upload carries
    the object store's create-if-absent precondition (GCS: ifGenerationMatch=0)."""
    path = as_path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        import fsspec

        filesystem, _ = fsspec.core.url_to_fs(str(path))
        try:
            filesystem.pipe_file(str(path), data, mode="create")
        except FileExistsError:  # gcsfs: 412 Precondition Failed
            return False
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, os.fspath(path))
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class LineLog:
    """An append-only text file of lines (metrics.jsonl). Locally it is appended to and flushed
    line by line; on an object store, which cannot append, the whole file is rewritten at each
    flush from the lines it holds (read back on open, so a resumed run keeps its history).

    A run killed while writing a line leaves it without its newline: that torn line is dropped
    on open (its step is trained and logged again on resume), so that the next line is not
    glued to it. `dropped` holds it (None if the file was whole)."""

    def __init__(self, path: PathLike):
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        text = self.path.read_text() if self.path.exists() else ""
        self.dropped = None
        if text and not text.endswith("\n"):
            keep = text.rfind("\n") + 1
            self.dropped, text = text[keep:], text[:keep]
            if not self.remote:
                with open(os.fspath(self.path), "r+b") as f:
                    f.truncate(len(text.encode("utf-8")))
        if self.remote:
            self._lines = [text] if text else []
            self._file = None
        else:
            self._file = open(os.fspath(self.path), "a")  # noqa: SIM115 - closed in close()

    def write(self, line: str) -> None:
        """Appends `line` (no newline in it) and makes it durable in the file."""
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._lines.append(line + "\n")
            self.path.write_text("".join(self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def move(source: PathLike, target: PathLike) -> None:
    """Moves a file or a directory tree. Locally a rename; an object store has no directories
    to rename, so each object is copied, then the source removed."""
    source, target = as_path(source), as_path(target)
    if not is_remote(source):
        source.rename(target)
        return
    if not source.is_dir():
        source.copy(target)
        source.unlink()
        return
    for directory, _, files in source.walk():
        for name in files:
            (target / (directory / name).relative_to(source)).parent.mkdir(
                parents=True, exist_ok=True
            )
            (directory / name).copy(target / (directory / name).relative_to(source))
    source.rmtree()


_STORES = {
    "gs": (
        "Google Cloud Storage",
        "credentials from `gcloud auth application-default login` or "
        "GOOGLE_APPLICATION_CREDENTIALS (STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL for an "
        "emulator)",
        "gcloud storage buckets create",
    ),
    "s3": (
        "S3",
        "credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws, and AWS_ENDPOINT_URL "
        "for a store other than AWS",
        "aws s3 mb",
    ),
}


def check_reachable(path: PathLike) -> None:
    """For a gs:// or s3:// path: its bucket exists and answers with the credentials at hand.
    Otherwise a ValueError of one line naming the store and the fix, before anything runs
    (a missing bucket would otherwise surface only at the first checkpoint save)."""
    if not is_remote(path):
        return
    scheme, _, rest = str(path).partition("://")
    bucket = f"{scheme}://{rest.split('/')[0]}"
    store, credentials, create = _STORES[scheme]
    try:  # listing (not exists(), which s3fs answers False on any error) tells the causes apart
        next(iter(as_path(bucket).iterdir()), None)
    except FileNotFoundError as e:
        raise ValueError(
            f"{store} bucket {bucket} does not exist (or these credentials cannot see it); "
            f"create it (`{create} {bucket}`) or fix the URL in {path}"
        ) from e
    except Exception as e:  # noqa: BLE001 - gcsfs/s3fs raise botocore, aiohttp, google-auth errors alike
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"{store} bucket {bucket} is out of reach ({type(e).__name__}: {first}); check the "
            f"network and {credentials}"
        ) from e


def save_figure(fig, path: PathLike, **kwargs) -> None:
    """`fig.savefig` to a local path or an object store (matplotlib writes local files only)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=as_path(path).suffix.lstrip(".") or "png", **kwargs)
    write_atomic(path, buffer.getvalue())
