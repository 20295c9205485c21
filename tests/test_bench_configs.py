"""Every config and campaign shipped in bench/ and examples/ loads and validates: a renamed or
mistyped key in a paper's campaign fails here, not an hour into a cluster job."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedmpi.campaigns.campaign import load_campaign
from fedmpi.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.glob("bench/*.yaml"), *ROOT.glob("examples/*.yaml")])


def is_campaign(path: Path) -> bool:
    spec = yaml.safe_load(path.read_text())
    return isinstance(spec, dict) and ("runs" in spec or "grid" in spec or "seeds" in spec)


def test_there_are_files_to_check():
    assert any(is_campaign(p) for p in FILES) and any(not is_campaign(p) for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_shipped_config_validates(path, tmp_path):
    if not is_campaign(path):
        load_config(path)
        return
    campaign = load_campaign(path, results_dir=tmp_path)
    assert campaign.runs, f"{path.name} expands to no runs"
    for run in campaign.runs:
        # a value taken from another run (from_run) is known once that run finished: a stand-in
        taken = {i.key: 0.5 for i in run.inputs}
        cfg = load_config(campaign.base, campaign.set_args(run, taken), extra=campaign.inline_config)
        for key, value in run.overrides.items():
            section, _, leaf = key.rpartition(".")
            node = cfg
            for part in filter(None, section.split(".")):
                node = node[part]
            assert node[leaf] == value, f"{path.name} {run.name}: {key} not applied"
