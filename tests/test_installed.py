"""fedmpi as a user installs it: the wheel (not this checkout's editable install) in a virtual
environment that lies inside another project's git repository, run from that project's directory.

The wheel is built (offline: pip wheel --no-build-isolation, with the test environment's
setuptools) from a copy of the checkout's build inputs: a build in the checkout itself would leave
build/ and fedmpi.egg-info there, and setuptools packs whatever a stale build/lib still holds into
later wheels.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import PY, REPO, TINY, read_results

TEMPLATE_IN_PACKAGE = "fedmpi/jobs/fedmpi-array.sbatch"
SETTINGS_END = "# <<< fedmpi settings"
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _run(args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _git(cwd: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid",
                "-c", "commit.gpgsign=false"]
    # not a repository that GIT_DIR & co. of the calling shell name
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    proc = _run(["git", *identity, *args], cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _git_repo(path: Path, files: dict[str, str]) -> str:
    """A fresh repository at ``path`` with ``files`` committed; its HEAD."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "--no-verify", "-m", "first")
    return _git(path, "rev-parse", "HEAD")


def _clean_env() -> dict:
    """No PYTHONPATH: what the runs import is what the environment has installed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "SLURM_JOB_ID")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


@pytest.fixture
def installed(tmp_path):
    """The wheel installed in a virtual environment inside another project's git repository:
    (project dir, venv dir, its site-packages, the wheel, the project's HEAD)."""
    work = tmp_path
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    # not the editable install's in-place build of the C kernels: the wheel must build its own
    shutil.copytree(REPO / "fedmpi", source / "fedmpi",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    wheels = work / "wheels"
    build = _run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--quiet", "-w", wheels, source], work, timeout=300)
    assert build.returncode == 0, f"pip wheel failed:\n{build.stderr[-3000:]}"
    (wheel,) = wheels.glob("fedmpi-*.whl")

    project = work / "other-project"
    head = _git_repo(project, {"README": "another project, with fedmpi installed in its .venv\n"})
    venv = project / ".venv"
    made = _run([PY, "-m", "venv", "--without-pip", venv], work)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     work).stdout.strip())
    # torch, h5py, ... from the test environment, linked in; not its editable fedmpi nor the
    # plug-in example installed beside it (their finders would shadow the wheel, their metadata
    # announce packages this environment cannot import)
    for package in Path(sysconfig.get_path("purelib")).iterdir():
        if "fedmpi" not in package.name.lower() and not package.name.startswith("__editable__"):
            (site / package.name).symlink_to(package)
    # and its MPI library: mpi4py looks for the mpich wheel's libmpi (and its lib/mpich) there
    for library in (Path(sys.prefix) / "lib").iterdir():
        if not library.name.startswith("python"):
            (venv / "lib" / library.name).symlink_to(library)
    install = _run([PY, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--quiet", wheel], work, timeout=300)
    assert install.returncode == 0, f"pip install failed:\n{install.stderr[-3000:]}"
    return project, venv, site, wheel, head


def _installed_results(project: Path, venv: Path) -> tuple[list[str], Path]:
    """``fedmpi run`` (the installed command) of TINY for 2 rounds in the other project, then
    ``fedmpi info`` and ``fedmpi plots`` of it: (what went wrong, the results file)."""
    fedmpi, problems = venv / "bin" / "fedmpi", []
    config = project / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "rounds": 2}))
    out = project / "results" / "tiny.h5"
    run = _run([fedmpi, "run", config, "--out", out, "--quiet"], project, env=_clean_env(),
               timeout=240)
    if run.returncode != 0:
        return [f"fedmpi run: exit {run.returncode}\n{run.stderr[-3000:]}"], out
    info = _run([fedmpi, "info", out], project, env=_clean_env())
    if info.returncode != 0 or "tiny.h5" not in info.stdout or "(installed)" not in info.stdout:
        problems.append(f"fedmpi info: exit {info.returncode}\n{info.stdout}{info.stderr[-3000:]}")
    plots = _run([fedmpi, "plots", "--results", "results", "--plots", "plots"], project,
                 env=_clean_env())
    if plots.returncode != 0 or not list((project / "plots").glob("*.png")):
        problems.append(f"fedmpi plots: exit {plots.returncode}, no figure\n{plots.stderr[-3000:]}")
    return problems, out


def _installed_sweep(project: Path, venv: Path, site: Path) -> list[str]:
    """``fedmpi sweep --slurm --dry-run`` with the installed command: what went wrong."""
    campaign = project / "campaign.yaml"
    campaign.write_text(yaml.safe_dump({"name": "tiny-slurm", "config": {**TINY, "rounds": 2},
                                        "ranks": 2, "seeds": 2}))
    proc = _run([venv / "bin" / "fedmpi", "sweep", campaign, "--slurm", "--dry-run"], project,
                env=_clean_env())
    if proc.returncode != 0:
        return [f"fedmpi sweep --slurm --dry-run: exit {proc.returncode}\n{proc.stderr[-3000:]}"]
    (script,) = (project / "results" / "tiny-slurm" / "slurm").glob("*.sbatch")
    rendered, template = script.read_text(), (site / TEMPLATE_IN_PACKAGE).read_text()
    settings = dict(re.findall(r"^(FEDMPI_\w+)=(\S+)$", rendered, re.M))
    problems = []
    # the job's body, after the settings block, is the packaged template's as written
    if rendered.split(SETTINGS_END, 1)[1] != template.split(SETTINGS_END, 1)[1]:
        problems.append(f"{script} is not rendered from {site / TEMPLATE_IN_PACKAGE}")
    if Path(settings["FEDMPI_PYTHON"]).parent != venv / "bin":
        problems.append(f"the job runs {settings['FEDMPI_PYTHON']}, not the environment's python")
    if Path(settings["FEDMPI_ROOT"]).resolve() != site.resolve():
        problems.append(f"the job imports fedmpi from {settings['FEDMPI_ROOT']}, not {site}")
    return problems


@pytest.mark.slow
def test_the_installed_wheel_runs_reports_plots_and_writes_slurm_jobs_outside_the_checkout(
        installed):
    """One test (not one per command): under pytest-xdist each worker would build its own wheel.
    Every command runs; the failures are reported together."""
    project, venv, site, wheel, head = installed
    problems = []
    names = zipfile.ZipFile(wheel).namelist()
    if TEMPLATE_IN_PACKAGE not in names:
        problems.append(f"the wheel lacks {TEMPLATE_IN_PACKAGE}")
    compiled = ("fedmpi/sparse_kernels/_csr_simd", "fedmpi/aggregation/_grid_pass")   # setup.py's extensions
    built = {lib for lib in compiled if any(re.fullmatch(re.escape(lib) + r"\..*\.so", n) for n in names)}
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) and len(built) < len(compiled):
        problems.append(f"a C compiler is here, but the wheel lacks the built {sorted(set(compiled) - built)}")
    where = _run([venv / "bin" / "python", "-c", "import fedmpi; print(fedmpi.__file__)"], project,
                 env=_clean_env())
    # not the checkout's editable install: then this test would say nothing about the wheel
    assert Path(where.stdout.strip()).resolve() == (site / "fedmpi" / "__init__.py").resolve(), \
        where.stdout + where.stderr

    run_problems, results = _installed_results(project, venv)
    problems += run_problems
    if results.exists():
        attrs = read_results(results)["attrs"]
        commit = str(attrs["git_commit"])
        if commit.startswith(head[:7]):
            problems.append(f"git_commit is {commit}: the commit of the repository around the "
                            f"environment, not fedmpi's")
        elif commit != f"installed fedmpi {attrs['fedmpi_version']}":
            problems.append(f"git_commit is {commit!r}, not 'installed fedmpi VERSION'")
        products = json.loads(attrs["versions"])["sparse_linear_products"]
        if compiled[0] in built and _cpu_has_avx512f() and products != "csr_simd":
            problems.append(f"the installed wheel's sparse Linear products are {products!r}, not csr_simd")
    problems += _installed_sweep(project, venv, site)
    assert not problems, "\n\n".join(problems)


def _cpu_has_avx512f() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _git_commit_of_copy(root: Path, project_name: str) -> tuple[str, str]:
    """(HEAD, what ``_git_commit`` records) for a copy of the package at the top of a new git
    repository whose pyproject.toml names ``project_name``."""
    checkout = root / project_name
    shutil.copytree(REPO / "fedmpi", checkout / "fedmpi",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    head = _git_repo(checkout, {"pyproject.toml": f'[project]\nname = "{project_name}"\n'})
    proc = _run([PY, "-c", "import fedmpi, fedmpi.cli as cli; print(fedmpi.__file__); "
                           "print(cli._git_commit())"],
                root, env={**_clean_env(), "PYTHONPATH": str(checkout)})
    assert proc.returncode == 0, proc.stderr
    imported, commit = proc.stdout.strip().splitlines()
    assert Path(imported).resolve() == (checkout / "fedmpi" / "__init__.py").resolve()
    return head, commit


def test_git_commit_is_recorded_only_from_fedmpis_own_checkout(tmp_path):
    from fedmpi import __version__

    head, commit = _git_commit_of_copy(tmp_path, "fedmpi")
    assert commit == head
    head, commit = _git_commit_of_copy(tmp_path, "another-project")
    assert head not in commit
    assert commit == f"installed fedmpi {__version__}"
