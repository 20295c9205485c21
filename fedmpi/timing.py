"""Modelled round time (``sim_seconds``) under a deterministic device profile.

A client's time = training FLOPs / device FLOP rate + upload bytes / uplink + download bytes /
downlink; a round lasts as long as its slowest client. The numbers are modelled, not measured, so
they are identical for any rank count and any machine. PruneFL's fuller per-layer time model
extends this module.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops_per_second: float      # sustained training throughput
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    description: str


_MBIT = 1e6 / 8

PROFILES = {
    p.name: p
    for p in (
        DeviceProfile("laptop", 20e9, 20 * _MBIT, 100 * _MBIT, "laptop CPU on home broadband"),
        DeviceProfile("raspberry-pi-4", 1.5e9, 10 * _MBIT, 50 * _MBIT, "Raspberry Pi 4 on Wi-Fi"),
        DeviceProfile("jetson-nano", 10e9, 10 * _MBIT, 50 * _MBIT, "Jetson Nano (GPU) on Wi-Fi"),
        DeviceProfile("phone-lte", 5e9, 5 * _MBIT, 20 * _MBIT, "smartphone on LTE"),
    )
}


def client_seconds(profile: DeviceProfile, train_flops: float, upload_bytes: int, download_bytes: int) -> float:
    return (train_flops / profile.flops_per_second
            + upload_bytes / profile.uplink_bytes_per_second
            + download_bytes / profile.downlink_bytes_per_second)
