"""The server's state between rounds, and its checkpoint beside the results file.

A checkpoint holds everything the server carries across rounds: the round number, cumulative
counters, every client's device state and last-known masks, and the algorithm's ``state_dict()``.
There is no RNG state: every draw is re-derived from (seed, round, client). It is written to a
temporary file, fsynced and renamed, so a kill leaves the old checkpoint or the new one.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..results import config_identity


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
    payload = {
        "round": state.round,
        "totals": vars(state.totals),
        "client_states": state.client_states,
        "known_masks": state.known_masks,
        "algorithm": algorithm_state,
        "config_identity": config_identity(cfg),
    }
    tmp = path.with_suffix(".ckpt.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill or a full disk leaves the old checkpoint or the new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written yet"
        raise OutputError(path, f"cannot write the checkpoint of round {state.round} ({exc.strerror}); {kept}") from None


def read_checkpoint(path: Path, cfg: dict) -> tuple[ServerState, dict]:
    """(server state, algorithm state); a corrupt file or another run's is bad input (exit 2)."""
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
        state = ServerState(payload["round"], RoundTotals(**payload["totals"]), payload["client_states"],
                            payload["known_masks"])
        algorithm_state, identity = payload["algorithm"], payload["config_identity"]
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user problem
        raise ConfigError("--resume", f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}); "
                          "remove it and rerun without --resume, or restore it") from None
    if identity != config_identity(cfg):
        raise ConfigError("--resume", f"{path} was written by a run with a different config; remove it or "
                          "resume with the same config")
    return state, algorithm_state
