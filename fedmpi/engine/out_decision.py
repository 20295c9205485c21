"""What ``fedmpi run`` does with its ``--out`` file, decided on rank 0 before any data is loaded
(docs/interface.md, "Resuming a run"): start it, continue it from its checkpoint, leave it as it is
(already finished), or refuse with a message naming what to do.

Nothing a user has is lost without ``--force``: ``--resume`` continues only a run of the same
config identity (``config_identity``) as the file's, from a checkpoint of that config, and never
truncates a file holding rounds it cannot continue.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..errors import ConfigError
from ..results import checkpoint_path, config_identity
from ..results.writer import identity_differences
from .checkpoint import checked_checkpoint

# pseudo-filesystems of the kernel and of devices: no place for a results file (under /dev a
# file may even replace a device node); /dev/shm is an ordinary tmpfs
SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
ORDINARY_UNDER_SPECIAL = ("/dev/shm",)


@dataclass
class StoredRun:
    """What an existing results file holds: its config identity, rounds, whether it finished;
    ``problem`` says why it could not be read."""

    identity: str = ""
    rounds: int = 0
    finished: bool = False
    problem: str = ""


def stored_run(path: Path) -> StoredRun:
    try:
        try:   # SWMR first: a writer killed mid-run leaves the file flagged as open for writing
            f = h5py.File(path, "r", swmr=True, locking=False)
        except OSError:
            f = h5py.File(path, "r", locking=False)
        with f:
            return StoredRun(config_identity(json.loads(f.attrs["config"])), len(f["rounds"]["round"]),
                             "finished" in f.attrs)
    except Exception as exc:  # noqa: BLE001 - not HDF5, or not a fedmpi results file
        return StoredRun(problem=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def decide_output(out: Path, cfg: dict, resume: bool, force: bool,
                  checkpoint: dict | None = None) -> tuple[str, str]:
    """``(decision, message)``: decision ``fresh`` (start the run, writing ``out``; the message, if
    any, says why a file is started over), ``resume`` (continue from the checkpoint), ``done``
    (finished already: exit 0) or ``error`` (exit 2, the message says what to fix). On ``resume``
    the checkpoint's contents, read and checked here, go into ``checkpoint`` if given: rank 0
    restores from them without reading the file a second time."""
    if out.is_dir():
        return "error", f"--out {out} is a directory; name a results file (e.g. {out / 'run.h5'})"
    decision, message = _against_existing(out, cfg, resume, force, checkpoint)
    if decision in ("fresh", "resume"):
        problem = unusable_directory(out)
        if problem:
            return "error", problem
    return decision, message


def _against_existing(out: Path, cfg: dict, resume: bool, force: bool,
                      checkpoint: dict | None) -> tuple[str, str]:
    ckpt = checkpoint_path(out)
    if not resume:
        if out.exists() and not force:
            return "error", f"{out} exists; pass --force to overwrite it or --resume to continue it"
        if ckpt.exists() and not force:
            return "error", (f"checkpoint {ckpt} exists without its results file {out}; restore the file and "
                             "pass --resume, or pass --force to start over")
        return "fresh", ""

    def refuse(problem: str, what: str = "to start the run over") -> tuple[str, str]:
        if force:
            return "fresh", f"--force: starting {out} over ({problem})"
        return "error", f"--resume: {problem}; pass --force {what}, or choose another --out"

    stored = stored_run(out) if out.exists() else None
    if stored is not None:
        if stored.problem:
            return refuse(f"{out} cannot be read as a fedmpi results file ({stored.problem})", "to overwrite it")
        differences = identity_differences(stored.identity, config_identity(cfg))
        if differences:
            return refuse(f"{out} holds a run of a different config ({differences}"
                          "); resume it with the config it was written with", "to overwrite it")
        if stored.finished:
            return "done", f"{out} is already finished; nothing to resume"
    if ckpt.exists():
        try:
            contents = checked_checkpoint(ckpt, cfg)
        except ConfigError as exc:   # its message says what to do
            if force:
                return "fresh", f"--force: starting {out} over; its checkpoint {ckpt} cannot be continued"
            return "error", f"--resume: {exc.problem}"
        if stored is None:
            return refuse(f"checkpoint {ckpt} has no results file {out} to continue; restore it")
        if stored.rounds < contents["round"]:
            return refuse(f"{out} holds {stored.rounds} rounds, fewer than the {contents['round']} its checkpoint "
                          f"{ckpt} was written after")
        if checkpoint is not None:
            checkpoint.update(contents)
        return "resume", ""
    if stored is not None and stored.rounds > 0:
        return refuse(f"{out} holds {stored.rounds} completed rounds and there is no checkpoint {ckpt} to continue "
                      "from", "to start the run over, discarding them")
    return "fresh", ""   # nothing to continue and nothing lost: a file without rounds starts over


def special_root(path: Path) -> str | None:
    """The kernel or device filesystem ``path`` (links followed) lies in, if any."""
    resolved = Path(os.path.realpath(path))
    inside = lambda root: resolved == Path(root) or Path(root) in resolved.parents  # noqa: E731
    if any(inside(root) for root in ORDINARY_UNDER_SPECIAL):
        return None
    return next((root for root in SPECIAL_ROOTS if inside(root)), None)


def unusable_directory(out: Path) -> str:
    """Why no results file can be written at ``out`` (its directory created if need be); ''
    if one can. A file is created and removed there to see: permissions alone miss read-only and
    special filesystems."""
    root = special_root(out)   # the file itself too: a link to a device must not be written through
    if root is not None:
        return (f"--out {out}: {root} is a kernel or device filesystem, which holds no results files; "
                "choose a writable path on a disk")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: cannot create its directory ({exc.strerror}); choose a writable path"
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedmpi-probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"--out {out}: cannot create a file in {out.parent} ({exc.strerror}); choose a writable path"
    return ""
