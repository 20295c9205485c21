"""``fedmpi profile``: measure this machine for one model (measure.py), fit the lines and
break-even densities (fits.py) and write the measured profile YAML (docs/timing.md)."""
from __future__ import annotations

import torch

from .fits import build_profile
from .measure import DEFAULT_DENSITIES, measure_model, trainer_seconds
from .profiles import MeasuredProfile


def machine_description() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "mkl": bool(torch.backends.mkl.is_available())}


def _default_shape(model_name: str) -> tuple[int, ...]:
    from ..errors import ConfigError
    from ..models import build_model

    for shape in ((1, 28, 28), (3, 32, 32), (60,)):
        try:
            build_model(model_name, shape, 10)
            return shape
        except ConfigError:
            continue
    raise ConfigError("--data-shape", f"give the input shape of {model_name}, e.g. --data-shape 3,32,32")


def profile_machine(model_name: str, out, *, data_shape=None, num_classes: int = 10, batch_size: int = 20,
                    densities=DEFAULT_DENSITIES, repeats: int = 5, min_time: float = 0.02,
                    link: str = "laptop", name: str | None = None, seed: int = 0, threads: int = 1,
                    progress=None, command: str = "", clock: str = "cpu", local: dict) -> MeasuredProfile:
    """``fedmpi profile``: measure, fit and write ``out`` (YAML); returns the profile as loaded back.
    ``local``: the config's ``local`` section, for the whole-model step through LocalTrainer."""
    import datetime
    from pathlib import Path

    import yaml

    from ..errors import ConfigError
    from ..models import build_model
    from .profiles import PROFILES, load_profile, profile_document

    if link not in PROFILES:
        raise ConfigError("--link", f"unknown profile '{link}'; choose one of {', '.join(PROFILES)}")
    if repeats < 1 or batch_size < 1 or not densities or any(not 0 < d <= 1 for d in densities):
        raise ConfigError("--densities", "need densities in (0, 1], --repeats >= 1 and --batch-size >= 1")
    shape = tuple(data_shape) if data_shape else _default_shape(model_name)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(model_name, shape, num_classes)
    layer_times = measure_model(model, shape, batch_size, densities, repeats=repeats, min_time=min_time,
                                seed=seed, progress=progress, clock=clock)
    if progress:
        progress("whole model through LocalTrainer (step and per-round overhead)")
    step, overhead = trainer_seconds(model_name, shape, num_classes, batch_size, local, repeats=repeats,
                                     seed=seed, clock=clock)
    out = Path(out)
    links = PROFILES[link]
    extra = {"machine": machine_description(),
             "measurement": {"densities": [float(d) for d in densities], "repeats": repeats,
                             "min_time": min_time, "seed": seed, "link_from": link, "clock": clock,
                             "trainer_step_seconds": [float(t) for t in step],
                             "trainer_overhead_seconds": [float(t) for t in overhead],
                             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "command": command}}
    profile = build_profile(
        name or out.stem, model_name, shape, num_classes, batch_size, layer_times, step,
        uplink=links.uplink_bytes_per_second, downlink=links.downlink_bytes_per_second, overhead=overhead,
        description=f"{model_name} {'x'.join(map(str, shape))}, {num_classes} classes, batch {batch_size}, "
                    f"measured on {extra['machine']['cpu']} ({threads} torch thread{'s' if threads > 1 else ''}); "
                    f"links of the built-in '{link}' profile", extra=extra)
    medians = {n: {k: lt.medians(k) for k in lt.times} for n, lt in layer_times.items()}
    doc = profile_document(profile, medians)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# measured device profile written by `fedmpi profile` (docs/timing.md); seconds per\n"
                   "# training step of `batch_size` samples; lines: intercept + slope * nonzero weights\n"
                   + yaml.safe_dump(doc, sort_keys=False, width=100, default_flow_style=None))
    return load_profile(str(out))
