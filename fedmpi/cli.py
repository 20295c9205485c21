"""Command line: ``fedmpi run | info | summarize | plots | sweep | profile`` (docs/interface.md)."""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .errors import ConfigError, FedmpiError, OutputError


ABORT_GRACE_SECONDS = 0.5


def _git_commit() -> str:
    """The commit of fedmpi's own source checkout (``HASH``, ``HASH-dirty``), ``unknown`` when git
    cannot say; ``installed fedmpi VERSION`` when fedmpi runs from anywhere else, such as a wheel in
    a virtual environment that happens to lie inside another project's repository: that
    repository's commit says nothing about this code."""
    source = Path(__file__).resolve().parents[1]   # a checkout: the directory of pyproject.toml
    try:
        project = re.search(r'^name\s*=\s*"([^"]*)"', (source / "pyproject.toml").read_text(), re.M)
    except OSError:
        project = None
    if not (project and project[1] == "fedmpi" and (source / ".git").exists()):
        return f"installed fedmpi {__version__}"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                              timeout=5)

    try:
        top = git("rev-parse", "--show-toplevel")
        out = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if top.returncode != 0 or out.returncode != 0:
        return "unknown"
    if Path(top.stdout.strip()).resolve() != source:
        return f"installed fedmpi {__version__}"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict:
    import h5py
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    from .sparse_kernels import simd

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "mpi4py": mpi4py.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            # floats differ across CPU kinds: record which kernels this machine ran
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "sparse_linear_products": "csr_simd" if simd.available() else f"mkl ({simd.unavailable_because()})"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def default_out_path(cfg: dict, config_path: str | None) -> Path:
    stem = cfg["experiment"] or (Path(config_path).stem if config_path else cfg["data"]["name"])
    return Path("results") / f"{stem}_{cfg['algorithm']}_seed{cfg['seed']}.h5"


def cmd_run(args) -> int:
    from .comm.transport import Communicator
    from .engine import report_failure

    comm = Communicator()
    try:
        return _run_on_every_rank(args, comm)
    except BaseException as exc:  # noqa: BLE001 - an unexpected failure on any rank ends every rank
        code = exc.exit_code if isinstance(exc, FedmpiError) else (130 if isinstance(exc, KeyboardInterrupt) else 1)
        if not isinstance(exc, FedmpiError):
            traceback.print_exc()
        report_failure(comm.rank, comm.size, exc)
        if comm.size > 1:
            # let the process manager forward this rank's message before MPI_Abort tears the job
            # down (under load, hydra can drop the last lines of an aborting rank)
            time.sleep(ABORT_GRACE_SECONDS)
            comm.abort(code)  # never leave the other ranks waiting in a collective
        if isinstance(exc, OutputError):
            # HDF5 would retry the failed writes while shutting down and can crash before exit
            sys.stdout.flush()
            os._exit(code)
        return code


def _run_on_every_rank(args, comm) -> int:
    """``fedmpi run`` on one rank. Failures every rank meets together (bad config, bad data, an
    existing results file) return their exit status here; anything else raises."""
    from .config import load_config
    from .engine import Run
    from .engine.out_decision import decide_output

    cfg, problem = None, None
    try:
        cfg = load_config(args.config, args.set or [])
        if args.progress is not None:
            cfg["output"]["progress"] = args.progress
    except ConfigError as exc:
        problem = str(exc)
    # a plug-in may load on one rank and not on another (another node's environment): the ranks
    # agree on the outcome before any of them goes on to a collective
    problems = comm.gather_objects((comm.rank, problem))
    verdict = None
    if comm.is_server:
        failed = [(rank, p) for rank, p in problems if p is not None]
        if failed:
            same = len(failed) == comm.size and len({p for _, p in failed}) == 1
            verdict = failed[0][1] if same else f"rank {failed[0][0]}: {failed[0][1]}"
    verdict = comm.bcast_object(verdict)
    if verdict is not None:
        if comm.is_server:
            print(f"fedmpi: {verdict}", file=sys.stderr)
        return ConfigError.exit_code
    comm.wait_mode = cfg["mpi"]["wait"]
    out = Path(args.out) if args.out else default_out_path(cfg, args.config)
    # rank 0 decides about --out before any data is loaded (engine.out_decision has the rules)
    checkpoint: dict = {}
    decision, message = comm.bcast_object(decide_output(out, cfg, args.resume, args.force, checkpoint)
                                          if comm.is_server else None)
    if comm.is_server and message:
        print(f"fedmpi: {message}", file=sys.stderr)
    if decision not in ("fresh", "resume"):
        return 0 if decision == "done" else 2
    progress = cfg["output"]["progress"]
    run = Run(cfg, comm, out, checkpoint=checkpoint if comm.is_server and decision == "resume" else None,
              progress=None if progress == "auto" else progress,
              versions=_versions() if comm.is_server else None, version=__version__,
              commit=_git_commit() if comm.is_server else "")
    try:
        run.setup()  # the ranks agree on the first setup error before any raises it
    except FedmpiError as exc:
        if comm.is_server:
            print(f"fedmpi: {exc}", file=sys.stderr)
        return exc.exit_code
    code = run.execute()
    run.close()
    if comm.is_server and code == 0:
        print(f"fedmpi: results in {out}", file=sys.stderr)
    return code


def cmd_info(args) -> int:
    from .results import info_text

    for path in args.files:
        if not Path(path).exists():
            print(f"fedmpi: {path}: no such file", file=sys.stderr)
            return 2
        print(info_text(path))
    return 0


def cmd_summarize(args) -> int:
    from .results import read_runs, summarize_table, unreadable_message

    skipped: list = []
    runs = read_runs(args.paths, skipped)
    if not runs:
        print(f"fedmpi: no readable results in {' '.join(args.paths)}: {unreadable_message(skipped)}; "
              "give it results files that `fedmpi run` wrote", file=sys.stderr)
        return 2
    print(summarize_table(runs))
    if skipped:
        print(f"fedmpi: the table leaves out {len(skipped)} unreadable file(s): {unreadable_message(skipped)}",
              file=sys.stderr)
    return 0


def cmd_plots(args) -> int:
    from .figures import draw_all

    draw_all(args.results, args.plots)  # raises DataError (exit 2) when no results file is readable
    return 0


def cmd_profile(args) -> int:
    """Measure this machine for one model and write a measured device profile (docs/timing.md)."""
    from .config import DEFAULTS
    from .timing.measure import DEFAULT_DENSITIES
    from .timing.profile_machine import profile_machine

    def numbers(text, kind, flag):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(flag, f"must be a comma-separated list, got {text!r}") from None

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"fedmpi: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    shape = numbers(args.data_shape, int, "--data-shape") if args.data_shape else None
    densities = numbers(args.densities, float, "--densities") if args.densities else DEFAULT_DENSITIES
    say = (lambda text: print(f"fedmpi profile: {text}", file=sys.stderr)) if not args.quiet else None
    profile = profile_machine(args.model, out, data_shape=shape, num_classes=args.classes,
                              batch_size=args.batch_size, densities=densities, repeats=args.repeats,
                              min_time=args.min_time, link=args.link, name=args.name, seed=args.seed,
                              threads=args.threads, progress=say, command=" ".join(sys.argv), clock=args.clock,
                              local=DEFAULTS["local"])
    for name, layer in profile.layers.items():
        print(f"{name:24s} dense {layer.dense(layer.numel) * 1e3:8.3f} ms  sparse break-even density "
              f"{layer.break_even:.3f} (active-gradient kernel {layer.break_even_active:.3f})")
    print(f"fedmpi: profile in {out}; use it with --set device.profile={out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .campaigns import add_sweep_parser

    parser = argparse.ArgumentParser(prog="fedmpi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment (under mpiexec for P > 1 ranks)")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key by its dotted name (repeatable)")
    run.add_argument("--out", help="results file (default: results/<experiment>_<algorithm>_seed<seed>.h5)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from the checkpoint beside it (same config only; "
                          "a file without rounds starts over)")
    run.add_argument("--force", action="store_true",
                     help="overwrite an existing results file (with --resume: only one that cannot be continued)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                       help="print one line per round (for batch logs)")
    group.add_argument("--quiet", dest="progress", action="store_const", const=False,
                       help="no progress output")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="summary of result files")
    info.add_argument("files", nargs="+")
    info.set_defaults(func=cmd_info)

    summarize = sub.add_parser("summarize", help="table over all runs in directories or files")
    summarize.add_argument("paths", nargs="*", default=["results"])
    summarize.set_defaults(func=cmd_summarize)

    plots = sub.add_parser("plots", help="draw every figure from the results files")
    plots.add_argument("--results", default="results")
    plots.add_argument("--plots", default="plots")
    plots.set_defaults(func=cmd_plots)

    prof = sub.add_parser("profile", help="measure this machine's per-layer step times into a device profile")
    prof.add_argument("--model", required=True, help="model name (config key model)")
    prof.add_argument("--data-shape", help="input shape C,H,W (default: the first of 1,28,28 / 3,32,32 / 60 "
                                           "the model takes)")
    prof.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    prof.add_argument("--batch-size", type=int, default=20, help="samples per step (default 20, PruneFL's)")
    prof.add_argument("--densities", help="comma-separated densities (default 0.01,0.02,0.05,0.1,0.2,0.3,0.5,"
                                          "0.7,0.9,1)")
    prof.add_argument("--repeats", type=int, default=5, help="measurements per density and kernel (default 5)")
    prof.add_argument("--min-time", type=float, default=0.02, help="seconds per measurement (default 0.02)")
    prof.add_argument("--link", default="laptop", help="built-in profile whose link bandwidths the file takes")
    prof.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as fedmpi run)")
    prof.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                      help="cpu: the thread's CPU time, robust on a shared machine (default); wall: elapsed time")
    prof.add_argument("--name", help="profile name (default: the file's stem)")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--out", required=True, help="the YAML file to write, e.g. profiles/NAME.yaml")
    prof.add_argument("--force", action="store_true", help="overwrite an existing file")
    prof.add_argument("--quiet", action="store_true", help="no progress lines")
    prof.set_defaults(func=cmd_profile)

    add_sweep_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedmpiError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # output piped into `head` and the like: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
