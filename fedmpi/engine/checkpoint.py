"""The server's state between rounds, and its checkpoint beside the results file.

A checkpoint holds everything the server carries across rounds: the round number, cumulative
counters, every client's device state and last-known masks, and the algorithm's ``state_dict()``.
There is no RNG state: every draw is re-derived from (seed, round, client). The file is data only
(``state_file``: arrays and JSON in an ``.npz``), so reading one cannot run code. It is written to
a temporary file, fsynced and renamed, so a kill leaves the old checkpoint or the new one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..results import config_identity
from ..results.writer import identity_differences
from .state_file import PickleFileError, StateFileError, read_state, write_state


@dataclass
class RoundTotals:
    """Cumulative counters carried across rounds (and through checkpoints)."""

    upload_bytes: int = 0
    download_bytes: int = 0
    wall_seconds: float = 0.0
    sim_seconds: float = 0.0
    train_flops: float = 0.0


@dataclass
class ServerState:
    round: int = 0
    totals: RoundTotals = field(default_factory=RoundTotals)
    client_states: dict = field(default_factory=dict)    # client → algorithm device state
    known_masks: dict = field(default_factory=dict)      # client → packed masks it last held


def write_checkpoint(path: Path, state: ServerState, algorithm_state: dict, cfg: dict) -> None:
    """Write the checkpoint atomically. State of a type a checkpoint cannot hold raises
    ``StateTypeError`` naming where it is (a programming error in the algorithm)."""
    header = {"round": state.round, "config_identity": config_identity(cfg)}
    tree = {"totals": vars(state.totals), "client_states": state.client_states,
            "known_masks": state.known_masks, "algorithm": algorithm_state}
    tmp = path.with_suffix(".ckpt.tmp")
    try:
        with open(tmp, "wb") as f:
            write_state(f, tree, header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill or a full disk leaves the old checkpoint or the new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written yet"
        raise OutputError(path, f"cannot write the checkpoint of round {state.round} ({exc.strerror}); "
                          f"{kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint_file(path: Path) -> dict:
    """The checkpoint's contents (``round``, ``config_identity``, ``totals``, ``client_states``,
    ``known_masks``, ``algorithm``); one that cannot be read is bad input (``ConfigError``, exit 2)."""
    try:
        header, tree = read_state(path)
        contents = {"round": int(header["round"]), "config_identity": str(header["config_identity"]),
                    **{key: tree[key] for key in ("totals", "client_states", "known_masks", "algorithm")}}
        RoundTotals(**contents["totals"])
    except PickleFileError:
        raise ConfigError("--resume", f"checkpoint {path} was written by an older fedmpi in pickle format, "
                          "which fedmpi no longer loads (loading a pickle can run code); remove it and "
                          "rerun with --force to start the run over") from None
    except StateFileError as exc:
        reason = str(exc)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a well-formed file without the checkpoint's parts
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return contents
    raise ConfigError("--resume", f"checkpoint {path} is truncated or corrupt ({reason}); remove it and rerun "
                      "with --force to start over, or restore it") from None


def checked_checkpoint(path: Path, cfg: dict) -> dict:
    """``read_checkpoint_file``, refused (exit 2) unless it was written by a run of ``cfg``."""
    contents = read_checkpoint_file(path)
    differences = identity_differences(contents["config_identity"], config_identity(cfg))
    if differences:
        raise ConfigError("--resume", f"checkpoint {path} was written by a run with a different config ("
                          f"{differences}); resume with the "
                          "config it was written with, or pass --force to start over")
    return contents


def read_checkpoint(path: Path, cfg: dict) -> tuple[ServerState, dict]:
    """(server state, algorithm state) from the checkpoint of a run of ``cfg``."""
    return restored(checked_checkpoint(path, cfg))


def restored(contents: dict) -> tuple[ServerState, dict]:
    """(server state, algorithm state) from a checkpoint's contents (``read_checkpoint_file``)."""
    state = ServerState(contents["round"], RoundTotals(**contents["totals"]), contents["client_states"],
                        contents["known_masks"])
    return state, contents["algorithm"]
