"""The core's extension points used for real, end to end (``python -m fedmpi`` in subprocesses,
P = 1, 2, 4): per-client submodels (depth and width slices) with exact bytes, per-exit, per-tier
and personalised evaluation identical for every rank count, an extra uploaded tensor with exact
bytes, and algorithm-declared columns read back by ``fedmpi info`` and drawn by ``fedmpi plots``."""
from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
import yaml

from helpers import (assert_all_columns_identical, fedmpi, needs_mpiexec, read_results, same_bits, variant_sizes,
                     write_idx)

pytestmark = pytest.mark.slow     # every test runs python -m fedmpi end to end (tiered_runs)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("extensions")


@pytest.fixture(scope="module")
def runs(tiered_runs):
    """``runs(algorithm, ranks, script=None)``: the session's tiered runs (conftest.py); with a
    ``script``, one of this module's SCRIPTS runs instead, its method given by import path
    (``__main__:Class``: a plug-in defined in the script itself)."""
    def get(algorithm, ranks, script=None):
        if script is None:
            return tiered_runs(algorithm, ranks)
        source, cls = SCRIPTS[script]
        return tiered_runs(f"__main__:{cls}", ranks, source)
    return get


# ------------------------------------------------------------------------------ submodels, P-invariance
@needs_mpiexec
@pytest.mark.parametrize("algorithm", ["depthfl", "heterofl"])
def test_tiered_runs_are_identical_for_1_2_4_ranks(runs, algorithm):
    _, base = runs(algorithm, 1)
    for column in ("exit_accuracy[1]", "exit_accuracy[3]", "tier_accuracy[1]", "tier_accuracy[3]"):
        assert np.all(np.isfinite(base["rounds"][column])), column
    assert set(base["clients"]["tier"].tolist()) == {1, 2, 3}
    for ranks in (2, 4):
        _, other = runs(algorithm, ranks)
        assert_all_columns_identical(base, other, f"{algorithm} P=1 vs P={ranks}")


@needs_mpiexec
def test_data_read_once_per_node_gives_the_bits_of_every_rank_reading_it(work, tiered_cfg, runs):
    """``mpi.share_data`` (default true) shares one copy of the dataset among a node's ranks; with
    it off every rank reads its own. Same results either way."""
    _, shared = runs("depthfl", 2)
    out = work / "depthfl_unshared_p2.h5"
    proc, _ = fedmpi(["run", str(tiered_cfg), "--out", str(out), "--quiet", "--set", "algorithm=depthfl",
                      "--set", "mpi.share_data=false"], 2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_all_columns_identical(shared, read_results(out), "share_data true vs false at P=2")


@needs_mpiexec
def test_a_corrupt_data_file_read_for_the_node_stops_every_rank_with_status_2(work, tiered_cfg):
    root = write_idx(work / "corrupt_mnist")
    damaged = root / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:300])
    cfg = yaml.safe_load(tiered_cfg.read_text())
    cfg["data"]["root"] = str(root)
    path = work / "corrupt_data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / "corrupt_data.h5"
    proc, seconds = fedmpi(["run", str(path), "--out", str(out), "--quiet"], 3, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(damaged) in proc.stderr and "truncated or corrupt" in proc.stderr
    assert not out.exists()


def test_depth_submodel_bytes_are_exact(runs):
    """A level-l client downloads and uploads exactly its blocks and exits, 4 bytes a value."""
    _, res = runs("depthfl", 1)
    clients = res["clients"]
    for level in (1, 2, 3):
        expected = 4 * sum(variant_sizes(level=level).values())
        this = clients["tier"] == level
        assert this.any()
        assert np.all(clients["upload_bytes"][this] == expected), level
        assert np.all(clients["download_bytes"][this] == expected), level
        # every tensor is a registered one at its full shape: 9 header bytes a tensor
        assert np.all(clients["header_bytes"][this] == 9 * len(variant_sizes(level=level)))


def test_width_slices_bytes_are_exact(runs):
    """HeteroFL: a rate-p client's tensors are blocks of the global ones (those it trains: no
    exits 1-2, no BN statistics); sliced rows also pay their description in the header (name,
    dtype, ndim, shape, start/end per dim). Of the classifier a client uploads the rows of its
    classes (``label_classes``), with bitmaps saying which (an index byte for a 1-entry bias)."""
    _, res = runs("heterofl", 1)
    clients = res["clients"]
    full = variant_sizes()
    for tier, width in ((1, 0.25), (2, 0.5), (3, 1.0)):
        variant = {"width": width, "track_running_stats": False, "exits": "last"}
        sizes = variant_sizes(**variant)
        this = clients["tier"] == tier
        assert np.all(clients["download_bytes"][this] == 4 * sum(sizes.values()))
        from fedmpi.models import build_model

        shapes = {n: t.shape for n, t in build_model("multiexit_vgg", (1, 28, 28), 10, **variant).state_dict().items()
                  if t.is_floating_point()}
        row = shapes["exits.2.linear.weight"][1]
        for upload, k in zip(clients["upload_bytes"][this].tolist(), clients["label_classes"][this].tolist()):
            masks = 0 if k == 10 else (10 * row + 7) // 8 + min(2, k)
            assert upload == 4 * (sum(sizes.values()) - (10 - k) * (row + 1)) + masks, (tier, k)
        header = sum(9 + (0 if sizes[n] == full[n] else len(n) + 3 + 12 * len(shapes[n])) for n in sizes)
        assert np.all(clients["header_bytes"][this] == header), tier


# ------------------------------------------------------------------------------ personalised evaluation
PERSONALISED = textwrap.dedent("""
    import sys
    import numpy as np
    from fedmpi import rng
    from fedmpi.algorithms import EvalModel
    from fedmpi.algorithms.heterogeneous import DepthwiseAveraging
    from fedmpi.cli import main

    class PersonalisedDepthFL(DepthwiseAveraging):
        '''Depth-wise averaging plus, for a few clients, "their own" masked model on their local
        test split (masks drawn from (seed, client)): LotteryFL's personalised accuracy.'''

        name = "personalised_depthfl"
        label = "personalised depth-wise averaging"
        doc = "tests/test_extensions.py"

        def round_columns(self):
            return {**super().round_columns(), "personal_accuracy": np.float64}

        def masks_of(self, client):
            g = rng.generator(self.cfg["seed"], 99, 0, client)
            return {n: g.random(self.weights[n].shape) < 0.7 for n in self.info.maskable}

        def evaluation_models(self, round_):
            own = [EvalModel(f"client{c}", self.weights, masks=self.masks_of(c), global_test=False,
                             local_clients=[c]) for c in (0, 3, 7)]
            return super().evaluation_models(round_) + own

        def evaluation_metrics(self, round_, outcomes):
            mine = [outcomes[f"client{c}"].client_accuracy(c) for c in (0, 3, 7)]
            assert outcomes["client0"].test_correct is None      # local test split only
            return {**super().evaluation_metrics(round_, outcomes), "personal_accuracy": float(np.mean(mine))}

    sys.exit(main(sys.argv[1:]))
""")

EXTRA_TENSOR = textwrap.dedent("""
    import sys
    import numpy as np
    from fedmpi.algorithms.heterogeneous import DepthwiseAveraging
    from fedmpi.cli import main

    class ImportanceUpload(DepthwiseAveraging):
        '''Every client also uploads an unregistered tensor (PruneFL's importance upload): here
        a 3x5 float32 filled with the client id; the server checks it arrived intact.'''

        name = "importance_upload"
        label = "depth-wise averaging with an extra upload"
        doc = "tests/test_extensions.py"

        def local_update(self, task, trainer):
            result = super().local_update(task, trainer)
            result.update.values["importance"] = np.full((3, 5), task.client_id, np.float32)
            return result

        def aggregate(self, round_, results):
            for r in results:
                got = r.update.values.pop("importance")
                assert got.shape == (3, 5) and got.dtype == np.float32 and np.all(got == r.client_id), got
            super().aggregate(round_, results)

    sys.exit(main(sys.argv[1:]))
""")
SCRIPTS = {"personalised": (PERSONALISED, "PersonalisedDepthFL"), "extra_tensor": (EXTRA_TENSOR, "ImportanceUpload")}


@needs_mpiexec
def test_personalised_and_per_exit_evaluation_identical_for_1_2_4_ranks(runs):
    _, base = runs("depthwise_avg", 1, "personalised")
    assert np.all(np.isfinite(base["rounds"]["personal_accuracy"]))
    _, plain = runs("depthwise_avg", 1)
    # the personalised models are really different models from the global one
    assert not same_bits(base["rounds"]["personal_accuracy"], base["rounds"]["client_accuracy"])
    assert same_bits(base["rounds"]["client_accuracy"], plain["rounds"]["client_accuracy"])
    for ranks in (2, 4):
        _, other = runs("depthwise_avg", ranks, "personalised")
        assert_all_columns_identical(base, other, f"personalised P=1 vs P={ranks}")


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 3])
def test_extra_tensor_upload_crosses_mpi_with_exact_bytes(runs, ranks):
    _, res = runs("depthwise_avg", ranks, "extra_tensor")
    _, plain = runs("depthwise_avg", 1)
    extra_values = 15 * 4
    extra_header = 9 + len("importance") + 3 + 4 * 2      # unregistered: name, dtype, ndim, 2 dims
    assert np.all(res["clients"]["upload_bytes"] == plain["clients"]["upload_bytes"] + extra_values)
    assert np.all(res["clients"]["header_bytes"] == plain["clients"]["header_bytes"] + extra_header)
    assert same_bits(res["rounds"]["client_accuracy"], plain["rounds"]["client_accuracy"])


# ------------------------------------------------------------------------------ declared columns
def test_declared_columns_are_read_by_info_and_drawn_by_plots(runs, work):
    path, res = runs("depthfl", 1)
    proc, _ = fedmpi(["info", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert "exit_accuracy[*]" in proc.stdout and "tier_accuracy[*]" in proc.stdout
    last = float(res["rounds"]["exit_accuracy[3]"][-1])   # info writes 4 significant digits
    exits = next(line for line in proc.stdout.splitlines() if "exit_accuracy[*]" in line)
    assert exits.endswith(f"3={int(last) if last.is_integer() else format(last, '.4g')}"), exits
    results = work / "declared_columns"        # this run alone: the session's directory holds others
    results.mkdir()
    shutil.copy(path, results)
    plots = work / "plots"
    proc, _ = fedmpi(["plots", "--results", str(results), "--plots", str(plots)])
    assert proc.returncode == 0, proc.stderr
    drawn = sorted(p.name for p in plots.glob("*algorithm_columns.png"))
    assert drawn, sorted(p.name for p in plots.iterdir())
