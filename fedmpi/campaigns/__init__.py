"""Experiment campaigns: expand a campaign file into named runs (:mod:`.campaign`; a run may take
a value from another run, :mod:`.depends`), then list them or run the missing ones here under
``mpiexec`` (:mod:`.local`), or submit them as SLURM array jobs (:mod:`.slurm`); ``fedmpi sweep``
is the command line over them (:mod:`.cli`). Before any of that, every run's config is validated
(:mod:`.validate`) and every value bound for a job is checked (:mod:`.checks`)."""
from fedmpi.campaigns.campaign import (
    MAX_NAME_LENGTH,
    Campaign,
    Run,
    SlurmSettings,
    expand_overrides,
    load_campaign,
    run_name,
    yaml_value,
)
from fedmpi.campaigns.cli import add_sweep_parser, sweep_main
from fedmpi.campaigns.depends import Input, resolve_line
from fedmpi.campaigns.local import list_runs, missing_runs, mpiexec_path, run_env, run_local
from fedmpi.campaigns.slurm import render_sbatch, submit_slurm, wait_for_job

__all__ = [
    "MAX_NAME_LENGTH", "Campaign", "Input", "Run", "SlurmSettings", "add_sweep_parser",
    "expand_overrides", "resolve_line",
    "list_runs", "load_campaign", "missing_runs", "mpiexec_path", "render_sbatch", "run_env",
    "run_local", "run_name", "submit_slurm", "sweep_main", "wait_for_job", "yaml_value",
]
