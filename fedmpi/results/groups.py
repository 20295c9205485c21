"""Grouping runs into settings: runs that differ only in their seed, or in config keys outside
a run's identity (``NON_IDENTITY_KEYS``), are repetitions of one setting. ``fedmpi summarize``,
the budget table and the figures work on these groups."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from fedmpi.results.reader import RunResult
from fedmpi.results.writer import identity_settings

# Short names for settings that show up in group labels.
LABEL_ABBREVIATIONS = {"sparsity": "S"}


@dataclass
class RunGroup:
    """Runs of one setting (differing only in seed); ``label`` names it within its experiment."""

    key: tuple
    experiment: str
    label: str
    runs: list

    @property
    def algorithm(self) -> str:
        return self.runs[0].algorithm

    @property
    def seeds(self) -> list:
        numeric = lambda s: isinstance(s, (int, float))  # noqa: E731
        return sorted((r.seed for r in self.runs),
                      key=lambda s: (not numeric(s), s if numeric(s) else str(s)))

    def is_sparse(self) -> bool:
        return any(r.is_sparse() for r in self.runs)


def _settings(run: RunResult) -> dict:
    """The config keys that change results, seed aside (it tells repetitions of a setting
    apart), values made hashable/comparable."""
    return {key: json.dumps(value, sort_keys=True)
            for key, value in identity_settings(run.config).items() if key != "seed"}


def group_key(run: RunResult) -> tuple:
    """(experiment, algorithm, settings fingerprint): equal for runs differing only in seed
    or in keys outside the run's identity (``NON_IDENTITY_KEYS``). Labels come from
    :func:`group_runs`."""
    fingerprint = json.dumps(_settings(run), sort_keys=True)
    return (run.experiment, run.algorithm, fingerprint)


def group_runs(runs: Iterable[RunResult]) -> list[RunGroup]:
    """Runs grouped by :func:`group_key`, labelled, sorted by experiment then label.

    A label is the algorithm, ``S=<sparsity>`` for sparse runs, and every setting that differs
    between groups of the same algorithm in the same experiment (e.g. "feddst S=0.8 alpha=0.05").
    """
    by_key: dict[tuple, list] = {}
    for run in runs:
        by_key.setdefault(group_key(run), []).append(run)

    groups = []
    for key, members in by_key.items():
        experiment, algorithm, _ = key
        siblings = [k for k in by_key if k[0] == experiment and k[1] == algorithm]
        sibling_settings = [_settings(by_key[k][0]) for k in siblings]
        differing = sorted(
            name for name in set().union(*sibling_settings)
            if len({s.get(name) for s in sibling_settings}) > 1 and name != "algorithm"
        )
        own = _settings(members[0])
        parts = [algorithm]
        sparse = any(r.is_sparse() for r in members)
        if sparse:
            parts.append(f"S={format_setting(members[0].config.get('sparsity'))}")
        for name in differing:
            if name == "sparsity" and sparse:
                continue
            short = LABEL_ABBREVIATIONS.get(name, name.removeprefix(algorithm + "."))
            value = json.loads(own[name]) if name in own else None
            parts.append(f"{short}={format_setting(value)}")
        groups.append(RunGroup(key=key, experiment=experiment, label=" ".join(parts), runs=members))
    groups.sort(key=lambda g: (g.experiment, g.label))
    return groups


def format_setting(value) -> str:
    """A config value as it appears in labels and ``fedmpi info``."""
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "unset"
    return str(value)
