"""Campaign files: parse one and expand it into named runs (each with its own overrides and
results file).

A campaign file (YAML; paths in it are relative to the file)::

    name: tiny-demo            # results go to results/<name>/<run-name>.h5 (or results_dir)
    base: ../bench/some.yaml   # the config every run starts from ... or an inline `config:` mapping
    set: {rounds: 50}          # overrides common to every run (not part of the run names)
    ranks: 2                   # MPI ranks per run
    seeds: [0, 1, 2]           # or a count: `seeds: 3` means 0, 1, 2
    grid:                      # cartesian product of dotted-key overrides
      algorithm: [fedavg, fedavgm]
    runs:                      # and/or an explicit list of override mappings
      - {algorithm: feddst, sparsity: 0.8}
      - {algorithm: prunefl, rounds: 31}
      # a value taken from another run of the same seed (its name without the seed part): the
      # final `density` of its per-round table; this run starts after that one finished
      - {algorithm: snip, snip.density: {from_run: "algorithm=prunefl_rounds=31", column: density}}
    slurm: {partition: debug, time: "01:00:00", ...}   # see SlurmSettings

Every run is (one grid point or one entry of ``runs``) x (one seed). Its name lists its own
overrides sorted by key, seed last: ``algorithm=fedavgm_seed=1`` (a ``from_run`` value is not
part of it: :mod:`.depends`). A run is finished when its results file carries the ``finished``
attribute; finished runs are never started again.
"""

from __future__ import annotations

import os

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmpi.campaigns.checks import check_overrides, text, word
from fedmpi.campaigns.depends import Input, has_reference, link, split_references
from fedmpi.config import flatten
from fedmpi.errors import ConfigError

# The directory holding the fedmpi package: the ranks import it from there (it need not be installed).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Package data (pyproject.toml), so an installed fedmpi has it too; jobs/ in a checkout links here.
DEFAULT_TEMPLATE = PACKAGE_ROOT / "fedmpi" / "jobs" / "fedmpi-array.sbatch"
CAMPAIGN_KEYS = {"name", "base", "config", "set", "ranks", "seeds", "grid", "runs", "results_dir",
                 "slurm"}
# Long names are cut and made unique with a hash: file systems limit a name to 255 bytes.
MAX_NAME_LENGTH = 120


@dataclass
class SlurmSettings:
    """How the array job asks for resources and starts the ranks (campaign's ``slurm:`` block)."""

    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    nodes: int | None = None        # spread a run's ranks over this many nodes (--nodes)
    tasks_per_node: int | None = None  # ranks on each node (--ntasks-per-node); nodes × this = ranks
    modules: list[str] = field(default_factory=list)
    mpi: str = "mpiexec"            # how ranks start inside the job: "mpiexec" or "srun"
    srun_mpi: str = "pmi2"          # srun --mpi=... when mpi is "srun"
    max_parallel: int | None = None  # at most this many array tasks at once (--array=...%N)
    extra_sbatch: list[str] = field(default_factory=list)  # more directives, e.g. "--qos=long"
    template: Path = DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Run:
    """One experiment of a campaign: its own overrides (seed included) and its results file."""

    name: str
    overrides: dict
    result: Path
    inputs: tuple[Input, ...] = ()   # values it takes from other runs (`from_run`), if any

    def set_args(self) -> list[str]:
        """The overrides as ``key=value`` strings, values written as YAML scalars."""
        return [f"{key}={yaml_value(value)}" for key, value in self.overrides.items()]

    def input_args(self, values: dict | None = None, files: bool = False) -> list[str]:
        """The values taken from other runs: ``key=value`` from ``values`` (key -> value), else
        placeholders ``key=<final COLUMN of RUN>`` (of its results file with ``files``)."""
        if values is None:
            return [i.placeholder(files) for i in self.inputs]
        return [f"{i.key}={yaml_value(values[i.key])}" for i in self.inputs]


@dataclass
class Campaign:
    """A parsed campaign file."""

    name: str
    base: Path | None       # config file every run starts from, or None with an inline config
    inline_config: dict | None
    common: dict            # overrides for every run (`set:`)
    ranks: int
    results_dir: Path
    runs: list[Run]
    slurm: SlurmSettings

    def config_path(self) -> Path:
        """The config file handed to ``fedmpi run``; an inline config is written out first."""
        if self.base is not None:
            return self.base
        path = self.results_dir / "campaign-config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.inline_config, sort_keys=False))
        return path

    def set_args(self, run: Run, values: dict | None = None) -> list[str]:
        """All ``--set`` values of ``run``: the common ones, the run's own, then those it takes
        from other runs (``values``: key -> value; without it, placeholders naming the files)."""
        return ([f"{k}={yaml_value(v)}" for k, v in self.common.items()] + run.set_args()
                + run.input_args(values, files=True))

    def run_args(self, run: Run, config: Path, values: dict | None = None) -> list[str]:
        """Arguments after ``python -m fedmpi``: run the experiment, resuming a checkpoint;
        ``values`` are those the run takes from other runs."""
        sets = [arg for item in self.set_args(run, values) for arg in ("--set", item)]
        return ["run", str(config), *sets, "--out", str(run.result), "--resume"]


def yaml_value(value) -> str:
    """``value`` written as a one-line YAML value, so ``--set`` reads back exactly ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text.removesuffix("\n...\n").strip()


def _name_part(value) -> str:
    if isinstance(value, bool) or value is None:
        return yaml_value(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_name_part(v) for v in value)
    return str(value)


def run_name(overrides: dict) -> str:
    """Stable, readable, file-system-safe name: ``key=value`` pairs sorted by key, seed last."""
    keys = sorted(overrides, key=lambda k: (k == "seed", k))
    name = "_".join(f"{k}={_name_part(overrides[k])}" for k in keys) or "base"
    name = re.sub(r"[^A-Za-z0-9.,+=_-]", "-", name)
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode())
        name = f"{name[:MAX_NAME_LENGTH - 11]}_{digest.hexdigest()[:10]}"
    return name


def _seed_list(seeds) -> list[int] | None:
    if seeds is None:
        return None
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                  for s in seeds):
        return seeds
    raise ConfigError("seeds", f"must be a positive count or a non-empty list of integers, "
                               f"got {seeds!r}")


def expand_overrides(grid: dict | None, runs: list | None, seeds) -> list[dict]:
    """Every run's own overrides: (grid points, then explicit runs) x seeds, duplicates dropped."""
    points = []
    if grid:
        if not isinstance(grid, dict):
            raise ConfigError("grid", "must be a mapping of dotted key -> list of values")
        axes = flatten(grid)
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}", f"must be a non-empty list, got {values!r}")
        points += [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    if runs:
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ConfigError("runs", "must be a list of mappings of dotted key -> value")
        points += [flatten(r) for r in runs]
    if not points:
        points = [{}]

    seed_list = _seed_list(seeds)
    expanded = []
    for point in points:
        if seed_list is None:
            expanded.append(point)
            continue
        if "seed" in point:
            raise ConfigError("seeds", "given both as `seeds` and inside grid/runs; use one")
        expanded += [{**point, "seed": seed} for seed in seed_list]

    unique = []
    for overrides in expanded:
        if overrides not in unique:
            unique.append(overrides)
    return unique


def positive_int(value, key: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(key, f"must be a {'non-negative' if allow_zero else 'positive'} "
                               f"integer, got {value!r}")
    return value


def _slurm_settings(block, campaign_dir: Path) -> SlurmSettings:
    if block is None:
        return SlurmSettings()
    if not isinstance(block, dict):
        raise ConfigError("slurm", "must be a mapping")
    known = set(SlurmSettings.__dataclass_fields__)
    unknown = set(block) - known
    if unknown:
        raise ConfigError(f"slurm.{sorted(unknown)[0]}", f"unknown; known keys: {sorted(known)}")
    settings = SlurmSettings(**{k: v for k, v in block.items() if v is not None})
    if settings.mpi not in ("mpiexec", "srun"):
        raise ConfigError("slurm.mpi", f"must be 'mpiexec' or 'srun', got {settings.mpi!r}")
    positive_int(settings.cpus_per_task, "slurm.cpus_per_task")
    positive_int(settings.gpus_per_task, "slurm.gpus_per_task", allow_zero=True)
    for key in ("max_parallel", "nodes", "tasks_per_node"):
        if getattr(settings, key) is not None:
            positive_int(getattr(settings, key), f"slurm.{key}")
    for key in ("modules", "extra_sbatch"):
        if not isinstance(getattr(settings, key), list):
            raise ConfigError(f"slurm.{key}", "must be a list")
    # each reaches the job script: an #SBATCH line, or the settings block the shell reads
    for key in ("partition", "account", "time", "srun_mpi"):
        if getattr(settings, key) is not None:
            setattr(settings, key, text(getattr(settings, key), f"slurm.{key}"))
    settings.modules = [word(m, f"slurm.modules[{i}]") for i, m in enumerate(settings.modules)]
    settings.extra_sbatch = [text(d, f"slurm.extra_sbatch[{i}]")
                             for i, d in enumerate(settings.extra_sbatch)]
    settings.template = (campaign_dir / settings.template).resolve()
    return settings


def load_campaign(path, results_dir=None) -> Campaign:
    """Read and check a campaign file; ``results_dir`` (a command-line flag) wins over the file's."""
    source = Path(path).resolve()
    try:
        spec = yaml.safe_load(source.read_text())
    except OSError as err:
        raise ConfigError("campaign", f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError("campaign", f"{path} is not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError("campaign", f"{path} must hold a mapping")
    unknown = set(spec) - CAMPAIGN_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown campaign key; known: {sorted(CAMPAIGN_KEYS)}")

    name = spec.get("name", source.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ConfigError("name", f"must be a non-empty file-system-safe string, got {name!r}")

    here = source.parent
    if ("base" in spec) == ("config" in spec):
        raise ConfigError("base", "give exactly one of `base` (a config file) or `config` "
                                  "(an inline mapping)")
    base = inline = None
    if "base" in spec:
        base = Path(text(str((here / text(spec["base"], "base")).resolve()), "base"))
        if not base.is_file():
            raise ConfigError("base", f"config file {base} does not exist")
    else:
        inline = spec["config"]
        if not isinstance(inline, dict):
            raise ConfigError("config", "must be a mapping")
    common = spec.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError("set", "must be a mapping of dotted key -> value")
    for block in ("set", "grid"):
        if has_reference(spec.get(block)):
            raise ConfigError(block, "a value from another run (from_run) goes in a `runs:` "
                                     "entry: the run that takes it")

    if results_dir is not None:
        results = Path(text(os.fspath(results_dir), "--results-dir")).resolve()
    elif "results_dir" in spec:
        results = (here / text(spec["results_dir"], "results_dir")).resolve()
    else:
        results = (Path.cwd() / "results" / name).resolve()
    # the run's results file is a field of the task table, the slurm/ directory an #SBATCH line
    text(str(results), "--results-dir" if results_dir is not None else "results_dir")
    check_overrides("set", flatten(common))
    for block in ("grid", "runs"):
        entries = spec.get(block) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                check_overrides(block, flatten(entry))

    runs, overrides_by_name, references, point_names, seeds = [], {}, {}, {}, {}
    for overrides in expand_overrides(spec.get("grid"), spec.get("runs"), spec.get("seeds")):
        own, refs = split_references(overrides)
        run_id = run_name(own)
        if run_id in overrides_by_name:
            raise ConfigError("runs", f"{overrides_by_name[run_id]} and {overrides} both get the "
                                      f"name {run_id!r}; make them differ in a named value")
        overrides_by_name[run_id] = overrides
        references[run_id] = refs
        point_names[run_id] = run_name({k: v for k, v in own.items() if k != "seed"})
        seeds[run_id] = own.get("seed")
        runs.append(Run(run_id, own, results / f"{run_id}.h5"))
    inputs = link(runs, references, point_names, seeds)
    runs = [Run(run.name, run.overrides, run.result, inputs.get(run.name, ())) for run in runs]

    ranks = positive_int(spec.get("ranks", 1), "ranks")
    slurm = _slurm_settings(spec.get("slurm"), here)
    check_layout(slurm, ranks)
    return Campaign(name=name, base=base, inline_config=inline, common=flatten(common), ranks=ranks,
                    results_dir=results, runs=runs, slurm=slurm)


def check_layout(slurm: SlurmSettings, ranks: int) -> None:
    """The ranks fit the nodes asked for: every node gets at least one rank, and with
    ``tasks_per_node`` exactly ``nodes × tasks_per_node`` ranks (``--ranks`` may change them)."""
    if slurm.tasks_per_node is not None:
        nodes = slurm.nodes or 1
        if nodes * slurm.tasks_per_node != ranks:
            raise ConfigError("slurm.tasks_per_node", f"{nodes} node(s) × {slurm.tasks_per_node} "
                                                      f"tasks per node is not the campaign's {ranks} "
                                                      f"ranks; make the product equal ranks")
    elif slurm.nodes is not None and slurm.nodes > ranks:
        raise ConfigError("slurm.nodes", f"{slurm.nodes} nodes for {ranks} ranks would leave a node "
                                         f"without a rank; ask for at most {ranks} nodes")
