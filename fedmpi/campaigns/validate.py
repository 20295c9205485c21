"""Every run of a campaign has its config loaded and validated before ``fedmpi sweep`` lists,
runs or submits anything, as ``fedmpi run`` will load it: the campaign's config, then the
common, the run's own and the taken ``--set`` values. Only configs are loaded (no data set, no
model), so a campaign of a hundred runs is checked in well under a second."""
from __future__ import annotations

import copy
from dataclasses import replace

from fedmpi.campaigns.campaign import Campaign, Run
from fedmpi.config import ConfigFileError, get_dotted, load_config
from fedmpi.errors import ConfigError

# Runs named in the message when several fail
SHOWN_RUNS = 5


def check_runs(campaign: Campaign) -> None:
    """ConfigError (exit 2) naming the first run whose config is bad, its key and the problem,
    and how many runs fail when more than one does."""
    failed = []
    for run in campaign.runs:
        try:
            _load(campaign, run, _stand_ins(campaign, run))
        except ConfigFileError:
            raise   # the campaign's config file itself: its own message names the file and line
        except ConfigError as err:
            failed.append((run, err))
    if not failed:
        return
    run, err = failed[0]
    more = ""
    if len(failed) > 1:
        names = [r.name for r, _ in failed]
        more = (f" ({len(failed)} of {len(campaign.runs)} runs fail this check: "
                f"{', '.join(names[:SHOWN_RUNS])}{', ...' if len(names) > SHOWN_RUNS else ''})")
    raise ConfigError(err.key, f"run {run.name}: {err.problem}{more}")


def _load(campaign: Campaign, run: Run, values: dict) -> dict:
    # an inline config is passed as a mapping, not written to its file: nothing is written yet
    inline = copy.deepcopy(campaign.inline_config) if campaign.inline_config is not None else None
    return load_config(campaign.base, campaign.set_args(run, values), extra=inline)


def _stand_ins(campaign: Campaign, run: Run) -> dict:
    """Values for what ``run`` takes from other runs (``from_run``), known only once those have
    finished. Each will be a column's final value, a float; its stand-in is the float of what the
    key holds in this run's config without it, so the check passes wherever a number fits that
    key (the real number is checked when the run starts), and 0.0 where the key holds no number:
    a key that does not exist, or takes no float, then fails here as it would in the run."""
    if not run.inputs:
        return {}
    cfg = _load(campaign, replace(run, inputs=()), {})
    values = {}
    for taken in run.inputs:
        try:
            held = get_dotted(cfg, taken.key)
        except (KeyError, TypeError):
            held = None
        number = isinstance(held, (int, float)) and not isinstance(held, bool)
        values[taken.key] = float(held) if number else 0.0
    return values
