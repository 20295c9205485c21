"""A campaign submitted to a real (single-node, throw-away) SLURM cluster as one array job.

Starts the cluster when this machine allows it (root; slurm-wlm and munge installable); otherwise
skips with the reason. Run alone with ``pytest -m slurm -s`` to see the timings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # the helper beside this file, whatever the rootdir
from slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

from fedmpi.sweep import load_campaign, run_status  # noqa: E402

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
TINY_CAMPAIGN = REPO / "examples" / "campaign-tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    if int(os.environ.get("PMI_SIZE", "1")) > 1:
        pytest.skip("one SLURM cluster per machine: not under mpiexec")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    with SlurmCluster() as slurm:
        print(f"\nSLURM cluster up in {time.monotonic() - started:.1f} s")
        yield slurm


def sweep(cluster, campaign: Path, *args: str, timeout: float = 110) -> subprocess.CompletedProcess:
    """``fedmpi sweep CAMPAIGN ARGS`` as a user would type it, talking to the test cluster."""
    command = [sys.executable, "-m", "fedmpi", "sweep", str(campaign), *args]
    result = subprocess.run(command, cwd=campaign.parent, env={**cluster.env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=timeout)
    print(result.stdout, result.stderr, sep="\n")
    return result


def test_tiny_campaign_completes_as_array_job_and_resubmitting_runs_nothing(cluster, tmp_path):
    campaign_file = tmp_path / "campaign.yaml"
    spec = yaml.safe_load(TINY_CAMPAIGN.read_text())
    spec["results_dir"] = "results"
    campaign_file.write_text(yaml.safe_dump(spec))
    campaign = load_campaign(campaign_file)
    assert len(campaign.runs) == 3

    started = time.monotonic()
    first = sweep(cluster, campaign_file, "--slurm", "--wait")
    job_seconds = time.monotonic() - started
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "results" / "slurm").glob("*.out")))
    assert first.returncode == 0, f"{first.stderr}\n{logs}\n{cluster.logs()}"
    assert "submitted array job" in first.stdout
    assert [run_status(run.result) for run in campaign.runs] == ["finished"] * 3, logs
    tables = list((tmp_path / "results" / "slurm").glob("*.tasks"))
    assert len(tables) == 1
    assert len(list((tmp_path / "results" / "slurm").glob("*.out"))) == 3
    print(f"3-run array job submitted and finished in {job_seconds:.1f} s")

    again = sweep(cluster, campaign_file, "--slurm")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert "submitted" not in again.stdout
    assert list((tmp_path / "results" / "slurm").glob("*.tasks")) == tables
