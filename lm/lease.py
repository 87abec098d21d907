"""One trainer per workdir: a lease held in the workdir, on a local disk or a bucket.

A trainer holds ``WORKDIR/lease/<n>.json`` (host, pid, start, heartbeat, a random token)
for as long as it runs; a background thread renews the heartbeat. The lease is taken by
*creating* the next number, create-if-absent (`lm.storage.create_exclusive`: a hard link
locally, GCS's ifGenerationMatch=0 precondition on a bucket), so of two trainers racing
for a workdir exactly one creates it and the other is refused at once, naming the holder.

The newest number is the lease. It is free when it is gone (released) or stale: its
heartbeat is older than the timeout, or its process is on this host and no longer runs
(a killed run frees its workdir at once). Taking over a stale lease creates the number after
it, so two trainers taking over race on one name too. A holder that finds a newer number
than its own, or its own file gone, has lost the lease (it was stalled past the timeout)
and must stop without saving: `check` raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np

from lm import storage

LEASE_DIR = "lease"


class WorkdirBusyError(ValueError):
    """Another trainer holds the workdir (a ValueError: the CLI prints it as one line)."""


class LeaseLostError(ValueError):
    """This trainer's lease was taken over by another trainer."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lease file says."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float) -> str:
        return (
            f"{self.host} pid {self.pid} (started {time.ctime(self.started)}, heartbeat "
            f"{now - self.heartbeat:.0f} s ago)"
        )


def _alive_here(holder: Holder) -> bool | None:
    """Whether the holder's process runs: known only on its own host (None elsewhere)."""
    if holder.host != socket.gethostname():
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def stale_reason(holder: Holder, timeout_s: float, now: float) -> str | None:
    """Why the lease may be taken over (its process is gone, or its heartbeat is older than
    `timeout_s`); None while it is held."""
    if _alive_here(holder) is False:
        return f"its process {holder.pid} on this host is not running"
    if now - holder.heartbeat > timeout_s:
        return f"its heartbeat is {now - holder.heartbeat:.0f} s old (train.lease_timeout_s={timeout_s:g})"
    return None


def _numbers(directory) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(
        int(p.stem) for p in directory.iterdir() if p.suffix == ".json" and p.stem.isdigit()
    )


def _read(path) -> Holder | None:
    """The holder a lease file names; None if it is gone (released between list and read)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


class Lease:
    """The workdir lease of this trainer (a context manager: acquire, renew, release).

    timeout_s: a heartbeat older than this frees the lease; it is renewed every tenth of it.
    """

    def __init__(self, workdir: storage.PathLike, timeout_s: float = 300.0):
        self.directory = storage.as_path(workdir) / LEASE_DIR
        self.timeout_s = timeout_s
        self.holder = Holder(
            socket.gethostname(), os.getpid(), time.time(), time.time(), secrets.token_hex(16)
        )
        self.number: int | None = None
        self.lost: str | None = None  # what took it over, once it was lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._made_workdir = False

    @property
    def path(self):
        return self.directory / f"{self.number:06d}.json"

    def _write(self, number: int, exclusive: bool) -> bool:
        holder = dataclasses.replace(self.holder, heartbeat=time.time())
        text = json.dumps(dataclasses.asdict(holder))
        path = self.directory / f"{number:06d}.json"
        if exclusive:
            return storage.create_exclusive(path, text)
        storage.write_atomic(path, text)
        return True

    def acquire(self) -> None:
        """Takes the lease, or raises WorkdirBusyError naming the holder. A stale lease is taken
        over with a warning that names it and why."""
        self._made_workdir = not self.directory.parent.exists()
        for _ in range(3):  # a number created between our list and our create: look again
            numbers = _numbers(self.directory)
            newest = numbers[-1] if numbers else 0
            holder = _read(self.directory / f"{newest:06d}.json") if numbers else None
            now = time.time()
            if holder is not None:
                reason = stale_reason(holder, self.timeout_s, now)
                if reason is None:
                    raise WorkdirBusyError(
                        f"{self.directory.parent} is in use by another trainer: "
                        f"{holder.describe(now)}; wait for it to finish or stop it, or use "
                        f"another --workdir (a lease whose heartbeat is older than "
                        f"train.lease_timeout_s={self.timeout_s:g} s is taken over)"
                    )
            if self._write(newest + 1, exclusive=True):
                self.number = newest + 1
                if holder is not None:
                    logging.warning(
                        "took over the lease of %s from %s: %s",
                        self.directory.parent,
                        holder.describe(now),
                        reason,
                    )
                self._forget_before(self.number)
                return
        raise WorkdirBusyError(
            f"{self.directory.parent}: could not take its lease, other trainers keep taking it; "
            "stop them, or use another --workdir"
        )

    def _forget_before(self, number: int) -> None:
        """Removes the lease files older than ours (each was released or taken over)."""
        for old in _numbers(self.directory):
            if old < number:
                (self.directory / f"{old:06d}.json").unlink(missing_ok=True)

    def _check_held(self) -> None:
        """Sets `lost` if a newer lease exists or ours is gone."""
        numbers = _numbers(self.directory)
        mine = _read(self.path)
        if mine is not None and mine.token == self.holder.token and numbers[-1] == self.number:
            return
        newest = _read(self.directory / f"{numbers[-1]:06d}.json") if numbers else None
        self.lost = newest.describe(time.time()) if newest is not None else "its file was removed"

    def _renew(self) -> None:
        while not self._stop.wait(max(self.timeout_s / 10, 0.5)):
            with self._lock:
                try:
                    self._check_held()
                    if self.lost is not None:
                        logging.error(
                            "lost the lease of %s to %s", self.directory.parent, self.lost
                        )
                        return
                    self._write(self.number, exclusive=False)
                except OSError as e:  # a store out of reach for a while: try at the next beat
                    logging.warning("could not renew the lease of %s: %s", self.directory.parent, e)

    def check(self) -> None:
        """Raises LeaseLostError if another trainer took the lease over (then this one must
        stop without saving: the workdir is the other trainer's)."""
        if self.lost is not None:
            raise LeaseLostError(
                f"another trainer took over {self.directory.parent} ({self.lost}) because this "
                f"run's heartbeat was older than train.lease_timeout_s={self.timeout_s:g} s; "
                "stopped without saving: the workdir is the other trainer's now"
            )

    def release(self) -> None:
        """Stops renewing and removes the lease file if it is still ours (and its folder, if
        that leaves it empty)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.number is None:
                return
            mine = _read(self.path)
            if mine is not None and mine.token == self.holder.token:
                self.path.unlink(missing_ok=True)
            if not storage.is_remote(self.directory) and self.directory.is_dir():
                if not any(self.directory.iterdir()):
                    self.directory.rmdir()
                workdir = self.directory.parent
                if self._made_workdir and not any(workdir.iterdir()):
                    workdir.rmdir()  # a run refused before any work leaves no folder behind
            self.number = None

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
        self._thread.start()

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_workdir(workdir: storage.PathLike, timeout_s: float):
    """The workdir's lease for a run's lifetime: process 0 holds it, the other processes of a
    multi-process run check that they see the lease process 0 took (the workdir must be the
    same for all: a shared filesystem or a bucket). Yields process 0's `Lease` (None in the
    others). A workdir that cannot be written is a ValueError naming it, before any work."""
    lease = Lease(workdir, timeout_s) if jax.process_index() == 0 else None
    error = None
    if lease is not None:
        try:
            lease.acquire()
        except (
            OSError
        ) as e:  # mkdir or create: a read-only disk, no permission, a path that is a file
            error = ValueError(
                f"cannot write to --workdir {workdir} ({type(e).__name__}: {e.strerror or e}); "
                "pass a directory this user can create and write"
            )
        except WorkdirBusyError as e:
            error = e
    if jax.process_count() > 1:
        _share_token(lease, error, workdir)
    if error is not None:
        raise error
    try:
        if lease is not None:
            lease.start_renewing()
        yield lease
    finally:
        if lease is not None:
            lease.release()


def _share_token(lease: Lease | None, error: Exception | None, workdir) -> None:
    """Process 0's lease token to every process; the others check the lease file names it."""
    from jax.experimental import multihost_utils

    token = lease.holder.token if lease is not None and error is None else ""
    shared = multihost_utils.broadcast_one_to_all(
        np.frombuffer(token.encode().ljust(32, b"\0"), np.uint8)
    )
    token = bytes(np.asarray(shared, np.uint8)).rstrip(b"\0").decode()
    if lease is not None:
        return
    if not token:
        raise WorkdirBusyError(f"process 0 could not take the lease of {workdir}: see its error")
    directory = storage.as_path(workdir) / LEASE_DIR
    numbers = _numbers(directory)
    holder = _read(directory / f"{numbers[-1]:06d}.json") if numbers else None
    if holder is None or holder.token != token:
        raise ValueError(
            f"process {jax.process_index()} does not see the lease process 0 holds in "
            f"{workdir}: every process of a run needs the same workdir (a shared filesystem or "
            "a bucket)"
        )
