"""``fedmpi sweep``: the command line over campaigns (list, run here, submit to SLURM)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.campaigns.campaign import check_layout, load_campaign, positive_int
from fedmpi.campaigns.checks import text
from fedmpi.campaigns.local import list_runs, missing_runs, run_local
from fedmpi.campaigns.slurm import submit_slurm
from fedmpi.campaigns.validate import check_runs
from fedmpi.errors import FedmpiError


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sweep`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "sweep", help="list, run or submit the runs of a campaign file",
        description="Expand a campaign file into runs; list them, run the missing ones here, or "
                    "submit them as SLURM array jobs. Finished runs are always skipped. A run "
                    "that takes a value from another run (from_run) starts after that one.")
    parser.add_argument("campaign", help="campaign YAML file")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true",
                        help="show every run's name, status (finished/partial/missing), overrides "
                             "(a value from another run as key=<final COLUMN of RUN>)")
    action.add_argument("--local", action="store_true",
                        help="run the missing runs under mpiexec (--jobs at a time), the runs "
                             "others take a value from first")
    action.add_argument("--slurm", action="store_true",
                        help="submit the missing runs as a SLURM array job (plus one with "
                             "--dependency=afterok for runs taking a value from another run)")
    parser.add_argument("--results-dir", help="where result files go (default: the campaign's "
                                              "results_dir, else results/<name>)")
    parser.add_argument("--ranks", type=int, help="MPI ranks per run (overrides the campaign)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --local: runs at a time (default 1); e.g. --ranks 1 --jobs 2 on 2 cores")
    slurm = parser.add_argument_group("with --slurm (override the campaign's slurm: block)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", help="time limit per run, e.g. 02:00:00")
    slurm.add_argument("--template", help="sbatch template (default: the package's "
                                          "fedmpi/jobs/fedmpi-array.sbatch)")
    slurm.add_argument("--wait", action="store_true",
                       help="block until the array job(s) have ended; exit 0 if every run finished")
    slurm.add_argument("--dry-run", action="store_true",
                       help="write the task table(s) and sbatch script(s) but do not submit")
    slurm.add_argument("--force", action="store_true",
                       help="submit even if a job of this campaign is still queued")
    parser.set_defaults(func=sweep_main)
    return parser


def sweep_main(args: argparse.Namespace) -> int:
    """Entry point of ``fedmpi sweep``; returns the exit status."""
    try:
        campaign = load_campaign(args.campaign, args.results_dir)
        if args.ranks is not None:
            campaign.ranks = positive_int(args.ranks, "--ranks")
            if args.slurm:
                check_layout(campaign.slurm, campaign.ranks)
        for flag in ("partition", "account", "time"):
            if getattr(args, flag):
                setattr(campaign.slurm, flag, text(getattr(args, flag), f"--{flag}"))
        if args.template:
            campaign.slurm.template = Path(args.template).resolve()
        # every run's config, before anything is listed, written or started
        check_runs(campaign)

        if args.list:
            return list_runs(campaign)
        todo = missing_runs(campaign)
        if not todo:
            print(f"all {len(campaign.runs)} runs of {campaign.name} are finished; nothing to do")
            return 0
        if args.local:
            return run_local(campaign, todo, positive_int(args.jobs, "--jobs"))
        return submit_slurm(campaign, todo, args.wait, args.dry_run, args.force)
    except FedmpiError as err:
        print(f"fedmpi sweep: {err}", file=sys.stderr)
        return err.exit_code
