"""Methods, models and data sets from outside fedmpi: declarations checked, plug-ins by entry point
(the installed example package, examples/topk_fedavg) and by import path, their provenance, and
what stops a run when a plug-in is broken (exit 2 before round 1, naming it)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import textwrap

import numpy as np
import pytest

from helpers import (REPO, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results, sigkill_and_resume,
                     write_config)

from fedmpi.algorithms import ALGORITHMS, Algorithm, check_declaration
from fedmpi.errors import ConfigError

EXAMPLE_INSTALLED = importlib.util.find_spec("topk_fedavg") is not None
needs_example = pytest.mark.skipif(
    not EXAMPLE_INSTALLED and not os.environ.get("CI"),
    reason="examples/topk_fedavg is not installed here (make venv installs it; CI requires it)")


# ------------------------------------------------------------------------------ declarations

@pytest.mark.parametrize("name", [n for n in ALGORITHMS if ALGORITHMS.origin(n).source == "builtin"])
def test_every_builtin_method_declares_itself_completely(name):
    cls = ALGORITHMS[name]
    check_declaration(name, cls)   # raises on anything missing
    assert (REPO / cls.doc).is_file(), f"{name}: its doc page {cls.doc} does not exist"
    for figure in cls.figures:
        module = importlib.import_module(f"fedmpi.figures.{figure}")
        assert callable(module.draw), f"{name}: figure module {figure} has no draw"
    labels = [c.label for n, c in ALGORITHMS.items() if n != name]
    assert cls.label not in labels, f"{name}: label {cls.label!r} is another method's"


def test_an_incomplete_declaration_is_refused():
    class NoLabel(Algorithm):
        name = "nolabel"
        doc = "x"

        def local_update(self, task, trainer):
            raise NotImplementedError

        def aggregate(self, round_, results, sums=None):
            raise NotImplementedError

    with pytest.raises(ConfigError, match="declares no label"):
        check_declaration("nolabel", NoLabel)
    NoLabel.label = "No label"
    check_declaration("nolabel", NoLabel)
    NoLabel.section, NoLabel.defaults = "nolabel", {"x": 1}
    with pytest.raises(ConfigError, match="declares no check_config"):
        check_declaration("nolabel", NoLabel)
    NoLabel.section = "data"
    with pytest.raises(ConfigError, match="one of fedmpi's own"):
        check_declaration("nolabel", NoLabel)
    with pytest.raises(ConfigError, match="registered as"):
        check_declaration("other", NoLabel)


def test_no_list_of_method_names_outside_the_registry():
    """Outside the methods' own modules (their classes and the figure modules they point to) no
    module of fedmpi names several methods: no second list of them exists."""
    names = [n for n in ALGORITHMS if ALGORITHMS.origin(n).source == "builtin"]
    own_figures = {f"{figure}.py" for n in names for figure in ALGORITHMS[n].figures}
    for path in (REPO / "fedmpi").rglob("*.py"):
        text = path.read_text()
        if path.parent.name == "algorithms" or (path.parent.name == "figures" and path.name in own_figures):
            continue
        listed = [n for n in names if f'"{n}"' in text]
        assert len(listed) < 3, f"{path.relative_to(REPO)} lists methods {listed}"


# ------------------------------------------------------------------------------ import path

PLUGIN = textwrap.dedent('''
    import numpy as np
    from fedmpi.algorithms.fedavg import FedAvg
    from fedmpi.errors import require

    class HalfStep(FedAvg):
        """FedAvg whose server moves halfway (times server.step) to the clients' mean."""
        name = "halfstep"
        label = "half-step FedAvg"
        doc = "tests/test_plugins.py"
        section = "halfstep"
        defaults = {"step": 0.5}

        @classmethod
        def check_config(cls, cfg):
            require(0 < cfg["halfstep"]["step"] <= 1, "halfstep.step", "must be in (0, 1]")

        def round_columns(self):
            return {"moved": np.float64}

        def aggregate(self, round_, results, sums=None):
            before = self.weights
            super().aggregate(round_, results, sums)
            s = self.cfg["halfstep"]["step"]
            self.weights = {n: (before[n] + s * (w - before[n])).astype(np.float32) for n, w in self.weights.items()}
            self._moved = float(sum(np.abs(self.weights[n] - before[n]).sum() for n in before))

        def round_metrics(self, round_):
            return {"moved": self._moved}

    class NoSection(FedAvg):
        name = "nosection"
        label = "broken"
        doc = "x"
        section = "nosection"
        defaults = {"step": object()}

        @classmethod
        def check_config(cls, cfg):
            pass
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("plugins")
    (work / "my_methods.py").write_text(PLUGIN)
    (work / "broken_import.py").write_text("import not_a_module_anywhere\n")
    return work


def run_with_path(args, plugin_dir, ranks=1):
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(plugin_dir)
    try:
        return fedmpi(args, ranks, timeout=180)[0]
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.slow
def test_a_method_by_import_path_runs_with_its_section_columns_and_provenance(plugin_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", algorithm="my_methods:HalfStep")
    out = tmp_path / "half.h5"
    proc = run_with_path(["run", str(config), "--out", str(out), "--quiet", "--set", "halfstep.step=0.25"],
                         plugin_dir)
    assert proc.returncode == 0, proc.stderr
    res = read_results(out)
    cfg = json.loads(res["attrs"]["config"])
    assert cfg["algorithm"] == "halfstep" and cfg["halfstep"] == {"step": 0.25}
    assert np.all(res["rounds"]["moved"] > 0)
    plugins = json.loads(res["attrs"]["plugins"])
    assert plugins == {"algorithm": {"name": "halfstep", "source": "import path", "target": "my_methods:HalfStep",
                                     "distribution": "", "version": ""}}
    info = run_with_path(["info", str(out)], plugin_dir)
    assert "algorithm halfstep from import path my_methods:HalfStep (not an installed package)" in info.stdout


@pytest.mark.parametrize("args, names", [
    (["--set", "algorithm=my_methods:NoSection"], ["nosection", "step: a default must be"]),
    (["--set", "algorithm=broken_import:Anything"], ["broken_import:Anything", "ModuleNotFoundError"]),
    (["--set", "algorithm=my_methods:Missing"], ["my_methods:Missing", "AttributeError"]),
    (["--set", "algorithm=my_methods:HalfStep", "--set", "halfstep.step=2"], ["halfstep.step", "(0, 1]"]),
    (["--set", "algorithm=fedavg", "--set", "halfstep.step=0.5"], ["unknown key"]),
])
def test_a_broken_plug_in_stops_before_round_1_with_exit_2_naming_it(plugin_dir, tmp_path, args, names):
    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "never.h5"
    proc = run_with_path(["run", str(config), "--out", str(out), *args], plugin_dir)
    assert proc.returncode == 2, proc.stderr
    for name in names:
        assert name in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------ entry points

TOPK_MLP_UPLOAD = (
    # examples/topk_fedavg at ratio 0.1 on the MLP for synthetic data (60 features, 10 classes):
    # per tensor n, k = ⌈0.1·n⌉, mask = bitmap ⌈n/8⌉ or positions (uint8 below 256 entries,
    # uint16 below 65,536) × k, whichever is smaller, then 4 bytes per value
    #   fc1.weight 12000: k 1200, bitmap 1500 < 2·1200            → 1500 + 4800
    #   fc1.bias     200: k   20, positions 1·20 = 20 < 25        →   20 +   80
    #   fc2.weight 40000: k 4000, bitmap 5000 < 8000              → 5000 + 16000
    #   fc2.bias     200: k   20, positions 20                    →   20 +   80
    #   fc3.weight  2000: k  200, bitmap 250 < 400                →  250 +  800
    #   fc3.bias      10: k    1, positions 1 < 2                 →    1 +    4
    1500 + 4800 + 20 + 80 + 5000 + 16000 + 20 + 80 + 250 + 800 + 1 + 4)


@pytest.fixture(scope="module")
def topk_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("topk")
    config = write_config(work / "topk.yaml", algorithm="topk_fedavg", rounds=3)
    runs = {}
    for ranks in (1, 3):
        out = work / f"topk_p{ranks}.h5"
        proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet", "--set", "topk_fedavg.ratio=0.1"],
                         ranks, timeout=240)
        assert proc.returncode == 0, proc.stderr
        runs[ranks] = read_results(out)
    return runs, work


@needs_example
@needs_mpiexec
@pytest.mark.slow
def test_the_example_plug_in_counts_its_bytes_and_is_the_same_on_1_and_3_ranks(topk_runs):
    runs, _ = topk_runs
    assert_all_columns_identical(runs[1], runs[3], "topk_fedavg P = 1 vs 3")
    assert np.all(runs[1]["clients"]["upload_bytes"] == TOPK_MLP_UPLOAD)
    assert np.all(runs[1]["clients"]["residual_norm"] > 0)
    plugins = json.loads(runs[1]["attrs"]["plugins"])["algorithm"]
    assert plugins["source"] == "entry point" and plugins["distribution"] == "fedmpi-topk-fedavg"
    assert plugins["version"] == "0.1.0"


@needs_example
@pytest.mark.slow
def test_the_example_plug_in_resumes_after_sigkill_bit_for_bit(tmp_path):
    """Its clients' residuals (device state) and the server's weights come back from the checkpoint."""
    config = write_config(tmp_path / "topk.yaml", algorithm="topk_fedavg", rounds=8,
                          clients={"total": 8, "per_round": 6},
                          local={"epochs": 3, "batch_size": 4, "lr": 0.05})
    reference, resumed = sigkill_and_resume(config, tmp_path, ["--set", "checkpoint.every=1"], r"^round 4/8")
    assert_all_columns_identical(reference, resumed, "topk_fedavg resumed after SIGKILL")
    assert np.all(np.diff(reference["rounds"]["round"]) == 1)


@needs_example
@pytest.mark.slow
def test_the_example_plug_in_is_drawn_beside_feddst(topk_runs, tmp_path):
    _, work = topk_runs
    feddst = work / "feddst.h5"
    config = write_config(work / "dst.yaml", algorithm="feddst", rounds=3, sparsity=0.8)
    proc, _ = fedmpi(["run", str(config), "--out", str(feddst), "--quiet", "--set", "feddst.readjust_every=1",
                      "--set", "feddst.r_end=3"], 1)
    assert proc.returncode == 0, proc.stderr
    results = tmp_path / "results"
    results.mkdir()
    for path in (work / "topk_p1.h5", feddst):
        (results / path.name).write_bytes(path.read_bytes())
    proc, _ = fedmpi(["plots", "--results", str(results), "--plots", str(tmp_path / "plots")], 1)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plots" / "synthetic_accuracy_vs_upload.png").is_file()
    budget = next((tmp_path / "plots").glob("*budget*.md")).read_text()   # the figure's table
    rows = [line.split("|")[1].strip() for line in budget.splitlines() if line.startswith("| ")]
    assert any(r.startswith("topk_fedavg") for r in rows) and any(r.startswith("feddst") for r in rows)


@needs_example
@pytest.mark.slow
def test_a_model_and_a_data_set_by_entry_point(tmp_path):
    g = np.random.default_rng(0)
    root = tmp_path / "table"
    root.mkdir()
    for split, n in (("train", 120), ("test", 40)):
        labels = g.integers(0, 3, n)
        features = g.normal(size=(n, 4)) + labels[:, None]
        np.savetxt(root / f"{split}.csv", np.column_stack([labels, features]), delimiter=",", fmt="%.6f")
    config = write_config(tmp_path / "c.yaml", model="logreg",
                          data={"name": "csv_table", "root": str(root), "partition": "iid"})
    out = tmp_path / "csv.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet"], 1)
    assert proc.returncode == 0, proc.stderr
    res = read_results(out)
    assert res["rounds"]["test_accuracy"][-1] > 0.5   # 3 separable classes
    plugins = json.loads(res["attrs"]["plugins"])
    assert plugins["model"]["target"] == "topk_fedavg.extras:LOGREG"
    assert plugins["data.name"]["target"] == "topk_fedavg.extras:CSV_TABLE"
    # 4 features → 3 classes: 15 parameters, downloaded dense as float32
    assert set(res["clients"]["download_bytes"]) == {15 * 4}
    (root / "test.csv").write_text("1,2,3\n")
    proc, _ = fedmpi(["run", str(config), "--out", str(tmp_path / "bad.h5")], 1)
    assert proc.returncode == 2 and "test.csv" in proc.stderr and "features" in proc.stderr


ONE_RANK_ONLY = textwrap.dedent('''
    import os
    from fedmpi.algorithms.fedavg import FedAvg

    if os.environ.get("PMI_RANK") == "1":   # as if this rank's node lacked a package the plug-in needs
        import a_package_missing_on_one_node

    class Everywhere(FedAvg):
        name = "everywhere_but_one"
        label = "FedAvg, unloadable on rank 1"
        doc = "tests/test_plugins.py"
''')


@needs_mpiexec
def test_a_plug_in_that_fails_on_one_rank_only_ends_every_rank_with_exit_2_naming_it(plugin_dir, tmp_path):
    (plugin_dir / "one_rank_only.py").write_text(ONE_RANK_ONLY)
    config = write_config(tmp_path / "c.yaml", algorithm="one_rank_only:Everywhere")
    proc = run_with_path(["run", str(config), "--out", str(tmp_path / "never.h5")], plugin_dir, ranks=3)
    assert proc.returncode == 2, proc.stderr
    assert "rank 1:" in proc.stderr and "a_package_missing_on_one_node" in proc.stderr
    assert not (tmp_path / "never.h5").exists()
