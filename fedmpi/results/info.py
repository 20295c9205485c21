"""``fedmpi info FILE.h5``: a human-readable overview of one results file, the columns its
algorithm declared included."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np

from fedmpi.results.groups import format_setting
from fedmpi.results.reader import RunResult, column_families, config_get, family_member, read_run
from fedmpi.results.tables import format_bytes, format_number, format_seconds


def method_label(name: str) -> str:
    """The method's declared label, or "" when no installed method has that name."""
    from fedmpi.algorithms import ALGORITHMS   # the declarations (a plug-in's only where installed)
    from fedmpi.errors import ConfigError

    try:
        return ALGORITHMS[name].label if name in ALGORITHMS else ""
    except ConfigError:   # a broken plug-in installed here: the file is still readable
        return ""


def info_text(path) -> str:
    """Human-readable overview of one results file (``fedmpi info FILE.h5``)."""
    run = read_run(path)
    cfg = run.config
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}

    partition = str(data.get("partition", "?"))
    if partition == "dirichlet":
        partition += f" (alpha={format_setting(data.get('alpha'))})"
    elif partition == "shards":
        partition += (f" ({format_setting(data.get('shards_per_client'))} shards/client"
                      f" of {format_setting(data.get('shard_size'))})")

    algorithm = run.algorithm
    label = method_label(run.algorithm)
    if label and label != algorithm:
        algorithm += f" ({label})"
    if run.is_sparse():
        algorithm += f" (sparsity {format_setting(cfg.get('sparsity'))})"
    if cfg.get("experiment"):
        algorithm += f", experiment '{cfg['experiment']}'"

    total = run.rounds_total
    status = "finished" if run.finished else "NOT finished (no 'finished' mark: running or killed)"
    rounds_line = f"{run.rounds_done}/{total if total is not None else '?'} done, {status}"
    if run.finished:
        rounds_line += f"; started {run.attrs.get('started', '?')}, finished {run.attrs['finished']}"
    else:
        rounds_line += f"; started {run.attrs.get('started', '?')}"

    def accuracy_line(name):
        final, best = run.final(name), run.best(name)
        if math.isnan(final):
            return "not evaluated yet"
        rounds = run.round_numbers()
        values = run.column(name)
        final_round = rounds[np.flatnonzero(np.isfinite(values))[-1]]
        best_round = rounds[int(np.nanargmax(values))]
        return f"final {final:.4f} (round {final_round}), best {best:.4f} (round {best_round})"

    upload, download = run.final("cum_upload_bytes"), run.final("cum_download_bytes")
    clients_total = run.clients_total
    versions = run.attrs.get("versions")
    try:
        versions = json.loads(versions) if isinstance(versions, str) else versions
    except ValueError:
        pass
    if isinstance(versions, dict):
        versions = ", ".join(f"{k} {v}" for k, v in versions.items())

    lines = [
        ("file", str(run.path)),
        ("algorithm", algorithm),
        ("data", f"{data.get('name', '?')}, partition {partition}, model {cfg.get('model', '?')}"),
        ("clients", f"{format_setting(config_get(cfg, 'clients.total'))} total, "
                    f"{format_setting(config_get(cfg, 'clients.per_round'))} per round"),
        ("seed", format_setting(run.seed)),
        ("rounds", rounds_line),
        ("test_accuracy", accuracy_line("test_accuracy")),
        ("client_accuracy", accuracy_line("client_accuracy")),
        ("upload", f"{format_bytes(upload)} total ({format_bytes(upload / clients_total)} per client)"),
        ("download", f"{format_bytes(download)} total"
                     f" ({format_bytes(download / clients_total)} per client)"),
        ("density", f"final {format_number(run.final('density'))}"),
        ("time", f"wall {format_seconds(run.final('cum_wall_seconds'))}, "
                 f"modelled {format_seconds(run.final('cum_sim_seconds'))}"),
        ("rank-0 memory", peak_rss_text(run)),
        ("mpi_size", str(run.attrs.get("mpi_size", "?"))),
        ("fedmpi", _fedmpi_version(run.attrs)),
        ("versions", str(versions) if versions else "not recorded"),
        ("plug-ins", plugins_text(run.attrs.get("plugins"))),
    ]
    width = max(len(name) for name, _ in lines) + 1
    text = [f"{name + ':':<{width}} {text}" for name, text in lines]
    return "\n".join(text + algorithm_column_lines(run))


def plugins_text(recorded) -> str:
    """The ``plugins`` attribute in words: each method, model or data set a plug-in gave the run."""
    if recorded is None:
        return "not recorded"
    try:
        used = json.loads(recorded)
    except (TypeError, ValueError):
        return "unreadable"
    if not used:
        return "none (fedmpi's own methods, model and data set)"
    parts = []
    for key, item in used.items():
        package = f"{item.get('distribution', '')} {item.get('version', '')}".strip() or "not an installed package"
        parts.append(f"{key} {item.get('name', '?')} from {item.get('source', '?')} {item.get('target', '')} "
                     f"({package})")
    return "; ".join(parts)


def peak_rss_text(run: RunResult) -> str:
    """Rank 0's peak resident set size (``server_peak_rss_bytes``, a high-water mark per process:
    the largest value over the rounds is the run's peak, whichever process wrote it)."""
    values = run.column("server_peak_rss_bytes")
    recorded = values[np.isfinite(values) & (values > 0)]   # older files: absent, or -1 before a resume
    return f"peak RSS {format_bytes(recorded.max())}" if recorded.size else "not recorded"


def algorithm_column_lines(run: RunResult) -> list[str]:
    """The columns the run's algorithm declared, a line per family: a plain column shows its
    last value and its mean over rounds; a per-layer family ``x[layer]`` shows every layer's
    value in the last round any of them has one. Per-client columns are first averaged over
    each round's clients."""
    lines = []
    for group, title in (("rounds", "per round"),
                         ("clients", "per client, mean over each round's clients")):
        names = list(run.extra_fields(group))
        if not names:
            continue
        rounds, series = _per_round(run, group, names)
        families = column_families(names)
        labels = {family: family + ("[*]" if any("[" in n for n in members) else "")
                  for family, members in families.items()}
        width = max(len(label) for label in labels.values())
        lines.append(f"algorithm columns, {title}:")
        for family, members in families.items():
            values = {family_member(name): series[name] for name in members}
            lines.append(f"  {labels[family]:<{width}}  "
                         f"{_family_text(rounds, values, per_layer=labels[family] != family)}")
    return lines


def _per_round(run: RunResult, group: str, names: list[str]) -> tuple[np.ndarray, dict]:
    """Round numbers and, per column, one value per round (clients: the mean over the round's)."""
    if group == "rounds":
        return run.round_numbers(), {name: run.column(name) for name in names}
    client_rounds = np.asarray(run.clients.get("round", []), dtype=np.int64)
    rounds = np.unique(client_rounds)
    series = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a round where no client has a value
        for name in names:
            values = run.column(name, "clients")
            series[name] = np.array([np.nanmean(values[client_rounds == r]) for r in rounds])
    return rounds, series


def _family_text(rounds: np.ndarray, values: dict, per_layer: bool) -> str:
    has_value = np.isfinite(np.vstack(list(values.values()))).any(axis=0)
    if not has_value.any():
        return "no values yet"
    last = np.flatnonzero(has_value)[-1]
    if per_layer:
        return f"round {rounds[last]}: " + ", ".join(
            f"{member}={_format_value(v[last])}" for member, v in values.items())
    (column,) = values.values()
    finite = column[np.isfinite(column)]
    return (f"last {_format_value(column[last])} (round {rounds[last]}), "
            f"mean {_format_value(finite.mean())} over {finite.size} rounds")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "—"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _fedmpi_version(attrs) -> str:
    """``0.1.0 (git abc123…)`` for a run from fedmpi's checkout, ``0.1.0 (installed)`` otherwise."""
    version, commit = attrs.get("fedmpi_version", "?"), str(attrs.get("git_commit", "?"))
    return f"{version} (installed)" if commit.startswith("installed") else f"{version} (git {commit})"
