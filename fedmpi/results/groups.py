"""Grouping runs into settings: runs that differ only in their seed, or in config keys outside
a run's identity (``NON_IDENTITY_KEYS``), are repetitions of one setting. ``fedmpi summarize``,
the budget table and the figures work on these groups."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from fedmpi.config.defaults import stored_defaults
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
    apart), values made hashable/comparable. A key the run's config lacks (written by a fedmpi
    that did not have it yet) counts as today's default (new keys default to the old behaviour),
    or as the method's ``before_key_existed`` value where a new key's default is not the old behaviour.
    Other methods' config sections are not part of a run's identity (``identity_settings``)."""
    settings = {**identity_settings(stored_defaults(run.config.get("algorithm"))), **identity_settings(run.config)}
    return {key: json.dumps(value, sort_keys=True) for key, value in settings.items() if key != "seed"}


def group_key(run: RunResult) -> tuple:
    """(experiment, algorithm, settings fingerprint): equal for runs differing only in seed
    or in keys outside the run's identity (``NON_IDENTITY_KEYS``). Labels come from
    :func:`group_runs`."""
    fingerprint = json.dumps(_settings(run), sort_keys=True)
    return (run.experiment, run.algorithm, fingerprint)


def group_runs(runs: Iterable[RunResult]) -> list[RunGroup]:
    """Runs grouped by :func:`group_key`, labelled, sorted by experiment then label.

    A key that a newer fedmpi added to its config does not split runs made before and after
    it (see :func:`_settings`). A label is the algorithm, ``S=<sparsity>`` for sparse runs, and each setting in which the
    group departs from the value most of the groups of that algorithm in that experiment share
    (e.g. "feddst S=0.8 alpha=0.2" beside plain "feddst S=0.8"); without a strict majority
    every group names its value.
    """
    by_key: dict[tuple, list] = {}
    for run in runs:
        by_key.setdefault(group_key(run), []).append(run)

    groups = []
    for key, members in by_key.items():
        experiment, algorithm, _ = key
        sibling_settings = [_settings(by_key[k][0]) for k in by_key if k[:2] == (experiment, algorithm)]
        own = _settings(members[0])
        keys = set().union(*sibling_settings)
        parts = [algorithm]
        sparse = any(r.is_sparse() for r in members)
        if sparse:
            parts.append(f"S={format_setting(members[0].config.get('sparsity'))}")
        # a switch that sets many keys at once (``feddst.public_code``) goes first, so a cut
        # legend entry still says what the group is
        for name in sorted(keys - {"algorithm"}, key=lambda n: (not n.endswith(".public_code"), n)):
            values = Counter(s.get(name) for s in sibling_settings)
            if len(values) < 2 or (name == "sparsity" and sparse):
                continue
            ranked = values.most_common()
            # the common value goes unnamed only when it is strictly the most frequent
            common_value = ranked[0][0] if ranked[0][1] > ranked[1][1] else None
            if own.get(name) != common_value:
                short = LABEL_ABBREVIATIONS.get(name, name.removeprefix(algorithm + "."))
                parts.append(f"{short}={format_setting(json.loads(own[name]) if name in own else None)}")
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
