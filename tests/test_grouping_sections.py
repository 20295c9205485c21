"""Which runs are one setting: other methods' config sections do not split a method's runs, and
SNIP/IMP runs pruned to each seed's own PruneFL density are one setting in PruneFL's table."""
from __future__ import annotations

from fake_results import make_config, make_rounds, write_fake_run

from fedmpi.figures.prunefl import method_name, per_seed_density_groups
from fedmpi.results.groups import group_runs
from fedmpi.results.reader import read_run


def runs(tmp_path, configs):
    rounds = make_rounds([0.5, 0.6, 0.7], 100)
    return [read_run(write_fake_run(tmp_path / f"run{i}.h5", config, rounds)) for i, config in enumerate(configs)]


def test_another_methods_section_does_not_split_a_setting_but_the_methods_own_does(tmp_path):
    configs = [make_config("prunefl", seed=0, rounds=3, scalefl={"kd_gamma": 0.05}),
               make_config("prunefl", seed=1, rounds=3, scalefl={"kd_gamma": 0.0}),
               make_config("prunefl", seed=2, rounds=3, prunefl={"reconfigure_every": 3})]
    groups = group_runs(runs(tmp_path, configs))
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    # the method's own section still tells settings apart, and so does a section a method shares
    # with its parent (RandomMask reads FedDST's)
    masks = [make_config("randommask", seed=s, rounds=3, feddst={"distribution": d})
             for s, d in ((0, "uniform"), (1, "erk"))]
    (tmp_path / "masks").mkdir()
    assert len(group_runs(runs(tmp_path / "masks", masks))) == 2


def test_snip_runs_at_each_seeds_density_are_one_setting_a_density_sweep_is_not(tmp_path):
    per_seed = [make_config("snip", seed=s, rounds=3, snip={"density": d}) for s, d in ((0, 0.21), (1, 0.22), (2, 0.23))]
    groups = per_seed_density_groups(group_runs(runs(tmp_path, per_seed)))
    assert len(groups) == 1 and len(groups[0].runs) == 3
    assert method_name(groups[0]) == "SNIP to PruneFL's final density (each seed's)"
    (tmp_path / "sweep").mkdir()
    sweep = [make_config("snip", seed=0, rounds=3, snip={"density": d}) for d in (0.1, 0.2, 0.3)]
    assert len(per_seed_density_groups(group_runs(runs(tmp_path / "sweep", sweep)))) == 3


def test_other_methods_sections_are_outside_a_runs_identity_for_resume_too():
    """--resume compares identities: another method's section (or its default) does not make a
    PruneFL run another run, its own section does, and an identity stored with every section (as
    checkpoints written before this rule hold it) still matches."""
    import json

    from fedmpi.config import flatten, load_config
    from fedmpi.results.writer import config_identity, identity_differences

    plain = load_config(None, ["algorithm=prunefl"])
    other = load_config(None, ["algorithm=prunefl", "scalefl.kd_gamma=0.05"])
    own = load_config(None, ["algorithm=prunefl", "prunefl.reconfigure_every=3"])
    assert identity_differences(config_identity(other), config_identity(plain)) == ""
    assert identity_differences(config_identity(own), config_identity(plain)).startswith("prunefl.reconfigure_every")
    stored_with_every_section = json.dumps(flatten(other), sort_keys=True)
    assert identity_differences(stored_with_every_section, config_identity(plain)) == ""
    scalefl = ["algorithm=scalefl", "model=multiexit_vgg_small"]
    assert identity_differences(config_identity(load_config(None, scalefl)), config_identity(
        load_config(None, [*scalefl, "scalefl.kd_gamma=0.05"]))) == "scalefl.kd_gamma: 0.0 → 0.05"


def test_a_key_added_after_a_checkpoint_was_written_counts_as_its_default_for_resume():
    """A checkpoint written before a config key existed (here data.unimib_layout) resumes when
    the key keeps its default, and is refused, naming the key, when it does not."""
    import json

    from fedmpi.config import load_config
    from fedmpi.results.writer import config_identity, identity_differences

    plain = load_config(None, ["algorithm=fedavg"])
    older = json.loads(config_identity(plain))
    del older["data.unimib_layout"]
    stored = json.dumps(older, sort_keys=True)
    assert identity_differences(stored, config_identity(plain)) == ""
    changed = load_config(None, ["algorithm=fedavg", "local.epochs=7"])
    assert identity_differences(stored, config_identity(changed)).startswith("local.epochs")
