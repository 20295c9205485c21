"""Runs that take a config value from another run of the same campaign.

In a ``runs:`` entry of a campaign file, a value may name the run it comes from::

    runs:
      - {algorithm: prunefl, rounds: 31}
      - {algorithm: snip, snip.density: {from_run: "algorithm=prunefl_rounds=31", column: density}}

``from_run`` is the producer's run name without its seed part (the dependent of seed s takes the
value of the producer's seed-s run); ``column`` a per-round column of the producer's results file
(its ``rounds`` group). The value is that column's last finite value once the producer has
finished (``RunResult.final``). The reference is not part of the dependent's run name
(``algorithm=snip_seed=0``), and a dependent starts only after its producer finished:
``sweep --local`` orders the runs, ``sweep --slurm`` submits the dependents as a later array job
with ``--dependency=afterok:`` on the producers' tasks.

The value is filled in just before the dependent starts: by ``sweep --local`` itself, and in a
SLURM task by ``python -m fedmpi.campaigns.resolve LINE`` (see jobs/fedmpi-array.sbatch), which
replaces each task-table field ``KEY=<final COLUMN of FILE>`` by ``KEY=VALUE``.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedmpi.campaigns.checks import word
from fedmpi.errors import ConfigError, DataError

FROM_RUN, COLUMN = "from_run", "column"
# A task-table field whose value another run's results give: KEY=<final COLUMN of FILE>
PLACEHOLDER = re.compile(r"^([^=\s]+)=<final (\S+) of (.+)>$")


@dataclass(frozen=True)
class Input:
    """A config value a run takes from another run: ``key`` = final ``column`` of ``run``."""

    key: str        # the dependent's config key, e.g. snip.density
    run: str        # the producer's run name (seed included)
    column: str     # a per-round column of the producer's results file
    result: Path    # the producer's results file

    def placeholder(self, files: bool = False) -> str:
        """``key=<final column of RUN>`` (of its results file with ``files``): the task-table
        field and the ``--list`` entry for the value not known yet."""
        return f"{self.key}=<final {self.column} of {self.result if files else self.run}>"


def split_references(overrides: dict) -> tuple[dict, dict[str, tuple[str, str]]]:
    """A flattened ``runs:`` entry split into its own overrides and its references
    ``key -> (from_run, column)`` (flattening turned ``key: {from_run, column}`` into
    ``key.from_run`` and ``key.column``)."""
    bases = [k[:-len(FROM_RUN) - 1] for k in overrides if k.endswith("." + FROM_RUN)]
    if FROM_RUN in overrides:
        raise ConfigError("runs", f"{FROM_RUN} must be the value of a config key, e.g. "
                                  f"snip.density: {{{FROM_RUN}: RUN, {COLUMN}: density}}")
    references, own = {}, dict(overrides)
    for base in bases:
        parts = {k[len(base) + 1:]: own.pop(k) for k in list(own) if k.startswith(base + ".")}
        unknown = set(parts) - {FROM_RUN, COLUMN}
        if unknown:
            raise ConfigError(f"{base}.{sorted(unknown)[0]}", f"unknown; a value from another run "
                                                              f"has only {FROM_RUN} and {COLUMN}")
        for part in (FROM_RUN, COLUMN):
            if not isinstance(parts.get(part), str) or not parts[part]:
                raise ConfigError(f"{base}.{part}", f"must be a non-empty string, got "
                                                    f"{parts.get(part)!r}")
        # the column goes into the task table as one word of KEY=<final COLUMN of FILE>
        references[base] = (parts[FROM_RUN], word(parts[COLUMN], f"{base}.{COLUMN}"))
    return own, references


def has_reference(value) -> bool:
    """True for a mapping or list holding a ``from_run`` key anywhere in it."""
    if isinstance(value, dict):
        return (any(str(k) == FROM_RUN or str(k).endswith("." + FROM_RUN) for k in value)
                or any(has_reference(v) for v in value.values()))
    return isinstance(value, list) and any(has_reference(v) for v in value)


def link(runs: list, references: dict[str, dict[str, tuple[str, str]]], point_names: dict,
         seeds: dict) -> dict[str, tuple[Input, ...]]:
    """Each dependent run's inputs, from its references: the producer is the run whose name
    without the seed is ``from_run`` and whose seed is the dependent's. ``point_names`` and
    ``seeds`` give each run's name without the seed and its seed (None without one).
    ConfigError (exit 2), naming the run, for an unknown producer, a missing seed or a cycle."""
    by_point = {(point_names[run.name], seeds[run.name]): run for run in runs}
    seeds_of: dict[str, list] = {}
    for run in runs:
        seeds_of.setdefault(point_names[run.name], []).append(seeds[run.name])
    inputs = {}
    for run in runs:
        found = []
        for key, (producer, column) in references.get(run.name, {}).items():
            where = f"{key}.{FROM_RUN}"
            if producer not in seeds_of:
                raise ConfigError(where, f"run {run.name}: {producer!r} is no run of this campaign "
                                         f"(give a run name without its seed part; names: "
                                         f"{', '.join(sorted(seeds_of))})")
            source = by_point.get((producer, seeds[run.name]))
            if source is None:
                raise ConfigError(where, f"run {run.name}: {producer!r} has no run with seed "
                                         f"{seeds[run.name]} (its seeds: "
                                         f"{', '.join(map(str, seeds_of[producer]))}); a run takes "
                                         f"its value from the producer's run of the same seed")
            found.append(Input(key, source.name, column, source.result))
        if found:
            inputs[run.name] = tuple(found)
    _check_acyclic(inputs)
    return inputs


def _check_acyclic(inputs: dict[str, tuple[Input, ...]]) -> None:
    state: dict[str, str] = {}      # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise ConfigError("runs", f"run {name} depends on itself through {FROM_RUN}: "
                                      f"{' -> '.join(cycle)}")
        state[name] = "visiting"
        for source in inputs.get(name, ()):
            visit(source.run, path + [name])
        state[name] = "done"

    for name in inputs:
        visit(name, [])


def levels(runs: list) -> dict[str, int]:
    """For runs to do: 0 for a run whose producers are all done already (not among ``runs``),
    else one more than its highest producer among ``runs``."""
    todo = {run.name: run for run in runs}
    level: dict[str, int] = {}

    def of(run) -> int:
        if run.name not in level:
            level[run.name] = max((of(todo[i.run]) + 1 for i in run.inputs if i.run in todo),
                                  default=0)
        return level[run.name]

    for run in runs:
        of(run)
    return level


def final_value(column: str, result: Path, producer: str | None = None) -> float:
    """The last finite value of the per-round ``column`` of the finished run ``result``.
    DataError (exit 2) when the file is missing, unfinished or has no such value."""
    from fedmpi.results import read_run

    run = read_run(result)      # DataError for a missing or unreadable file
    name = producer or Path(result).stem
    if not run.finished:
        raise DataError(result, f"run {name} has not finished; its final {column} is not known yet")
    value = run.final(column)
    if value != value:          # NaN: no such column, or never a finite value
        raise DataError(result, f"run {name} has no final value of the per-round column {column!r}")
    return value


def resolve(inputs) -> dict[str, float]:
    """``key -> value`` for the inputs of a run whose producers have finished."""
    return {i.key: final_value(i.column, i.result, i.run) for i in inputs}


def resolve_line(line: str) -> tuple[str, list[str]]:
    """A task-table line with each ``KEY=<final COLUMN of FILE>`` field replaced by
    ``KEY=VALUE``; and a note per value for the task's log."""
    from fedmpi.campaigns.campaign import yaml_value

    fields, notes = line.rstrip("\n").split("\t"), []
    for n, text in enumerate(fields[2:], 2):
        match = PLACEHOLDER.match(text)
        if match:
            key, column, result = match.groups()
            value = final_value(column, Path(result))
            fields[n] = f"{key}={yaml_value(value)}"
            notes.append(f"{fields[n]} (final {column} of {result})")
    return "\t".join(fields), notes


def main(argv=None) -> int:
    """``python -m fedmpi.campaigns.resolve LINE``: print LINE with its values filled in."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fedmpi.campaigns.resolve TASK-TABLE-LINE", file=sys.stderr)
        return 2
    try:
        line, notes = resolve_line(argv[0])
    except DataError as err:
        print(f"fedmpi: cannot start this run: {err}", file=sys.stderr)
        return err.exit_code
    for note in notes:
        print(f"fedmpi: {note}", file=sys.stderr)
    print(line)
    return 0
