"""Aggregation rules, FedAvg / FedAvgM / FedProx server and client hooks, client-to-rank assignment."""
import itertools

import numpy as np
import pytest
import torch

from fedmpi.aggregation import average_over_holders
from fedmpi.algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from fedmpi.config import load_config
from fedmpi.engine import assign_clients
from fedmpi.update import ModelUpdate

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ whole tensors
def hand_weighted_average(tensors, weights):
    """Element by element, Python floats (float64), clients summed in the order given."""
    total = 0.0
    for w in weights:
        total += float(w)
    out = {}
    for name in tensors[0]:
        flat = [t[name].reshape(-1) for t in tensors]
        result = np.empty(flat[0].size, dtype=np.float32)
        for i in range(result.size):
            acc = 0.0
            for f, w in zip(flat, weights):
                acc += float(w) * float(f[i])
            result[i] = np.float32(acc / total)
        out[name] = result.reshape(tensors[0][name].shape)
    return out


def float32_zeros_like(tensors):
    return {name: np.zeros(np.shape(t), np.float32) for name, t in tensors.items()}


def test_average_over_holders_of_whole_tensors_matches_hand_computation():
    rng = np.random.default_rng(0)
    tensors = [{"w": rng.standard_normal((4, 5)).astype(np.float32),
                "b": rng.standard_normal(5).astype(np.float32)} for _ in range(3)]
    copies = [{n: v.copy() for n, v in t.items()} for t in tensors]
    weights = [42, 800, 47]
    reference = {n: np.full(np.shape(t), 9.0, np.float32) for n, t in tensors[0].items()}
    got, votes = average_over_holders([ModelUpdate(t) for t in tensors], weights, reference)
    want = hand_weighted_average(tensors, weights)
    assert set(got) == set(votes) == {"w", "b"}
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(votes[name], np.full(want[name].shape, 889.0))
    for t, c in zip(tensors, copies):                   # inputs untouched
        for n in t:
            np.testing.assert_array_equal(t[n], c[n])


def test_equal_weights_give_the_mean_and_one_client_is_the_identity():
    rng = np.random.default_rng(1)
    t = rng.standard_normal(100).astype(np.float32)
    reference = {"t": np.zeros(100, np.float32)}
    np.testing.assert_array_equal(average_over_holders([ModelUpdate({"t": t})], [17], reference)[0]["t"], t)
    two, _ = average_over_holders([ModelUpdate({"t": t}), ModelUpdate({"t": -t})], [3, 3], reference)
    np.testing.assert_array_equal(two["t"], np.zeros_like(t))


# ------------------------------------------------------------------------------ masked tensors
def test_masked_average_matches_hand_computation():
    """FedDST's merge: per masked element Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k, 0 where no client kept
    it (missing="zero"); unmasked tensors get the plain weighted average."""
    rng = np.random.default_rng(2)
    n = 8
    weights = [10, 30, 7]
    # masks per position: kept by (0,1,2), (0,2), (1), (), (2), (0,1), (0), (1,2)
    keepers = [(0, 1, 2), (0, 2), (1,), (), (2,), (0, 1), (0,), (1, 2)]
    masks = [{"w": np.array([k in kept for kept in keepers])} for k in range(3)]
    tensors = []
    for k in range(3):
        # values outside a client's mask are garbage: the rule must ignore them
        tensors.append({"w": (rng.standard_normal(n) * 5).astype(np.float32),
                        "b": rng.standard_normal(3).astype(np.float32)})
    updates = [ModelUpdate(t, m) for t, m in zip(tensors, masks)]
    out, votes = average_over_holders(updates, weights, float32_zeros_like(tensors[0]), missing="zero")
    np.testing.assert_array_equal(votes["w"], [sum(weights[k] for k in kept) for kept in keepers])
    np.testing.assert_array_equal(votes["b"], [47, 47, 47])

    want = np.zeros(n, dtype=np.float32)
    for i, kept in enumerate(keepers):
        num, den = 0.0, 0.0
        for k in kept:
            num += weights[k] * float(tensors[k]["w"][i])
            den += weights[k]
        want[i] = np.float32(num / den) if den > 0 else np.float32(0)
    np.testing.assert_array_equal(out["w"], want)
    # a weight kept by one client only is that client's value; one kept by none is 0
    assert out["w"][2] == tensors[1]["w"][2]
    assert out["w"][6] == tensors[0]["w"][6]
    assert out["w"][3] == 0.0 and votes["w"][3] == 0
    # the unmasked tensor gets the plain sample-weighted mean
    np.testing.assert_array_equal(out["b"], hand_weighted_average(tensors, weights)["b"])
    assert out["w"].dtype == out["b"].dtype == np.float32


def test_full_masks_average_like_no_masks():
    rng = np.random.default_rng(3)
    tensors = [{"w": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(3)]
    full = {"w": np.ones((3, 4), dtype=bool)}
    weights = [5, 1, 9]
    reference = float32_zeros_like(tensors[0])
    out, votes = average_over_holders([ModelUpdate(t, full) for t in tensors], weights, reference, missing="zero")
    plain, plain_votes = average_over_holders([ModelUpdate(t) for t in tensors], weights, reference, missing="zero")
    np.testing.assert_array_equal(out["w"], plain["w"])
    np.testing.assert_array_equal(votes["w"], plain_votes["w"])
    assert (votes["w"] == 15).all()


# ------------------------------------------------------------------------------ average over holders
def test_average_over_holders_by_hand_with_slices_masks_and_tensor_subsets():
    """3 clients: A holds the block [0:3, 0:3] of w, B the block [1:4, 2:5] minus one masked element,
    C the whole tensor but only 3 elements in its mask. Values outside masks are garbage."""
    reference = {"w": (100 + np.arange(20, dtype=np.float32)).reshape(4, 5),
                 "b": np.array([-1, -2, -3], np.float32),
                 "c": np.array([7, 8], np.float32),                 # nobody sends it
                 "steps": np.array(5, np.int64)}
    original = {n: v.copy() for n, v in reference.items()}
    b_mask = np.ones((3, 3), bool)
    b_mask[2, 2] = False                                            # global (3, 4)
    b_values = np.full((3, 3), 4, np.float32)
    b_values[2, 2] = np.nan
    c_mask = np.zeros((4, 5), bool)
    c_mask[0, 0] = c_mask[1, 2] = c_mask[0, 4] = True
    c_values = np.where(c_mask, np.float32(10), np.float32(1e30))
    updates = [
        ModelUpdate({"w": np.ones((3, 3), np.float32), "b": np.full(3, 2, np.float32), "steps": np.array(2)},
                    slices={"w": ((0, 3), (0, 3))}),
        ModelUpdate({"w": b_values}, {"w": b_mask}, {"w": ((1, 4), (2, 5))}),
        ModelUpdate({"w": c_values, "b": np.full(3, 5, np.float32), "steps": np.array(3)}, {"w": c_mask}),
    ]
    weights = [1, 2, 3]
    nobody = np.nan
    want_w = np.array([[31 / 4, 1, 1, nobody, 10],          # (0,0): (1·1 + 3·10) / 4
                       [1, 1, 39 / 6, 4, 4],                # (1,2): (1·1 + 2·4 + 3·10) / 6
                       [1, 1, 9 / 3, 4, 4],                 # (2,2): (1·1 + 2·4) / 3
                       [nobody, nobody, 4, 4, nobody]])
    want_votes = np.array([[4, 1, 1, 0, 3],
                           [1, 1, 6, 2, 2],
                           [1, 1, 3, 2, 2],
                           [0, 0, 2, 2, 0]], dtype=np.float64)

    kept, votes = average_over_holders(updates, weights, reference, missing="keep")
    zeroed, zero_votes = average_over_holders(updates, weights, reference, missing="zero")
    held = ~np.isnan(want_w)
    np.testing.assert_array_equal(kept["w"], np.where(held, want_w, reference["w"]).astype(np.float32))
    np.testing.assert_array_equal(zeroed["w"], np.where(held, want_w, 0).astype(np.float32))
    np.testing.assert_array_equal(kept["b"], [4.25] * 3)             # (1·2 + 3·5) / 4, B did not send b
    np.testing.assert_array_equal(kept["c"], reference["c"])
    np.testing.assert_array_equal(zeroed["c"], [0, 0])
    assert kept["steps"] == 3 and kept["steps"].dtype == np.int64     # (1·2 + 3·3) / 4 = 2.75, rounded
    for name in ("w", "b", "c"):
        assert kept[name].dtype == zeroed[name].dtype == np.float32
        assert kept[name].shape == zeroed[name].shape == reference[name].shape
    for v in (votes, zero_votes):
        np.testing.assert_array_equal(v["w"], want_votes)
        np.testing.assert_array_equal(v["b"], [4, 4, 4])
        np.testing.assert_array_equal(v["c"], [0, 0])
        assert v["steps"] == 4 and v["w"].dtype == np.float64
    for name, value in original.items():                             # the reference is left as it was
        np.testing.assert_array_equal(reference[name], value)


@pytest.mark.parametrize("masks", [{}, {"x": np.array([True])}], ids=["whole", "masked"])
def test_average_over_holders_sums_the_holders_in_the_given_order(masks):
    # float64 cancellation: (1e20 + 1) - 1e20 = 0 but (1e20 - 1e20) + 1 = 1
    a, b, c = ({"x": np.array([v], np.float32)} for v in (1e20, 1.0, -1e20))
    reference = {"x": np.zeros(1, np.float32)}
    for order, want in (([a, b, c], 0.0), ([a, c, b], 1 / 3)):
        out, _ = average_over_holders([ModelUpdate(t, masks) for t in order], [1, 1, 1], reference)
        assert out["x"][0] == np.float32(want)


@pytest.mark.parametrize("bad", [
    dict(missing="drop"),
    dict(slices={"w": ((0, 3), (3, 6))}),          # past the end of the reference
    dict(slices={"w": ((0, 3),)}),                 # wrong number of dimensions
    dict(values={"w": np.ones((2, 3), np.float32)}),
])
def test_average_over_holders_rejects_inconsistent_inputs(bad):
    update = ModelUpdate(bad.get("values", {"w": np.ones((3, 3), np.float32)}), slices=bad.get("slices", {}))
    with pytest.raises(ValueError):
        average_over_holders([update], [1.0], {"w": np.zeros((4, 5), np.float32)}, bad.get("missing", "keep"))


@pytest.mark.parametrize("same_masks", [True, False])
def test_merging_packed_uploads_is_bit_identical_and_never_densifies_them(same_masks):
    # the server decodes uploads without densifying them and merges the (positions, values) as
    # they arrived: the same float64 operations per element as the dense arrays. same_masks: every
    # client sent values only against the mask it was sent (FedDST between readjustments), so
    # the packed values are summed position by position; else some sent new masks
    from fedmpi.comm.codec import MaskPositions, decode, encode

    rng = np.random.default_rng(31)
    shapes = {"w1": (40, 30), "w2": (7, 3, 3, 3), "b": (9,)}
    reference = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    global_masks = {n: rng.random(s) < 0.3 for n, s in shapes.items() if n != "b"}
    uploads, dense_uploads = [], []
    cache = MaskPositions()
    for k in range(6):
        own = global_masks if same_masks or k % 2 else {n: rng.random(shapes[n]) < 0.3 for n in global_masks}
        values = {n: np.where(own[n], rng.standard_normal(s), 0).astype(np.float32) if n in own else
                  rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        enc = encode(ModelUpdate(values, own), global_masks)
        dense_uploads.append(decode(enc, global_masks))
        uploads.append(decode(enc, global_masks, densify=False, positions_cache=cache))
    weights = [3.0, 1.0, 2.5, 7.0, 1.0, 0.5]
    for missing in ("keep", "zero"):
        got = average_over_holders(uploads, weights, reference, missing=missing)
        want = average_over_holders(dense_uploads, weights, reference, missing=missing)
        for part in (0, 1):
            assert_bits_equal(got[part], want[part])
    assert all(set(u.values._pending) == set(global_masks) for u in uploads)   # never densified


def assert_bits_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def hand_average_over_holders(tensors, masks, weights):
    """missing="zero" element by element in Python floats: w·θ summed over the holders in client
    order, divided by their summed weights; a tensor nobody masks is divided by
    np.sum(weights), the documented total (see the pairwise-total test below)."""
    out, votes = {}, {}
    for name, first in tensors[0].items():
        masked = any(name in m for m in masks)
        flat = [t[name].reshape(-1) for t in tensors]
        held = [m[name].reshape(-1) if name in m else np.ones(first.size, bool) for m in masks]
        result, denominators = np.zeros(first.size, np.float32), np.zeros(first.size)
        for i in range(first.size):
            numerator, denominator = 0.0, 0.0
            for f, h, w in zip(flat, held, weights):
                if h[i]:
                    numerator += float(w) * float(f[i])
                    denominator += float(w)
            if not masked:
                denominator = float(np.sum(np.asarray(weights, dtype=np.float64)))
            if denominator > 0:
                result[i] = np.float32(numerator / denominator)
            denominators[i] = denominator
        out[name], votes[name] = result.reshape(first.shape), denominators.reshape(first.shape)
    return out, votes


def test_average_over_holders_matches_an_element_by_element_hand_sum():
    """Up to 12 clients with fractional weights, so that the order of float64 sums matters; masks
    from empty to full, values outside them garbage."""
    rng = np.random.default_rng(17)
    for case in range(40):
        clients = int(rng.integers(1, 13))
        weights = (list(rng.random(clients) * 100) if case % 2 else [int(n) for n in rng.integers(1, 900, clients)])
        shapes = {"w1": (int(rng.integers(1, 30)), 7), "b1": (7,), "w2": (3, 2, int(rng.integers(1, 9)))}
        tensors = [{n: (rng.standard_normal(s) * 10.0 ** rng.integers(-2, 3)).astype(np.float32)
                    for n, s in shapes.items()} for _ in range(clients)]
        masks = [{n: rng.random(shapes[n]) < rng.choice([0.0, 0.1, 0.5, 1.0]) for n in ("w1", "w2")}
                 for _ in range(clients)]
        updates = [ModelUpdate(t, m) for t, m in zip(tensors, masks)]
        got, got_votes = average_over_holders(updates, weights, float32_zeros_like(tensors[0]), missing="zero")
        want, want_votes = hand_average_over_holders(tensors, masks, weights)
        assert_bits_equal(got, want)
        assert_bits_equal(got_votes, want_votes)


def test_plain_average_keeps_dividing_by_the_pairwise_total():
    """np.sum (pairwise for 8+ terms) and a running sum of fractional weights can differ in the last
    bit; when the average lies halfway between two float32 numbers that bit decides the rounding.
    Clients sending a whole unmasked tensor are divided by np.sum(weights), as before."""
    low = np.float32(1)
    high = np.nextafter(low, np.float32(2))
    sensitive = 0
    for seed in range(100):
        half = np.random.default_rng(seed).random(5)
        weights = list(np.concatenate([half, half]))           # exact average: halfway from low to high
        tensors = [{"x": np.array([low if k < 5 else high])} for k in range(10)]
        numerator, running_total = 0.0, 0.0
        for w, t in zip(weights, tensors):
            numerator += w * float(t["x"][0])
            running_total += w
        if np.float32(numerator / running_total) == np.float32(numerator / np.sum(weights)):
            continue
        sensitive += 1
        got, _ = average_over_holders([ModelUpdate(t) for t in tensors], weights, {"x": np.zeros(1, np.float32)})
        assert_bits_equal(got, {"x": np.array([numerator / np.sum(weights)], np.float32)})
    assert sensitive > 5


# ------------------------------------------------------------------------------ algorithms
def make_cfg(*overrides):
    return load_config(None, ["data.name=synthetic", "model=mlp", "clients.total=8", "clients.per_round=3",
                              "local.batch_size=16", "local.lr=0.05", *overrides])


def make_info(shapes):
    return ModelInfo(shapes=dict(shapes), maskable=[n for n in shapes if n.endswith("weight")], layer_flops={})


def client_results(rng, shapes, sizes):
    return [ClientResult(c, n, ModelUpdate({k: rng.standard_normal(s).astype(np.float32)
                                            for k, s in shapes.items()}), 0.0, n)
            for c, n in enumerate(sizes)]


SHAPES = {"fc.weight": (6, 4), "fc.bias": (6,)}


def test_fedavg_aggregate_is_the_sample_weighted_mean():
    rng = np.random.default_rng(4)
    alg = build_algorithm(make_cfg("algorithm=fedavg"), make_info(SHAPES))
    alg.init_server({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, np.random.default_rng(0))
    results = client_results(rng, SHAPES, [40, 120, 7])
    alg.aggregate(1, results)
    want = hand_weighted_average([r.update.values for r in results], [40, 120, 7])
    for name in SHAPES:
        np.testing.assert_array_equal(alg.global_weights()[name], want[name])


def test_fedavgm_two_rounds_follow_the_momentum_formula():
    beta, eta = 0.8, 0.7
    rng = np.random.default_rng(5)
    cfg = make_cfg("algorithm=fedavgm", f"fedavgm.momentum={beta}", f"fedavgm.server_lr={eta}")
    alg = build_algorithm(cfg, make_info(SHAPES))
    theta0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    alg.init_server({k: v.copy() for k, v in theta0.items()}, np.random.default_rng(0))

    theta = {k: v.astype(np.float64) for k, v in theta0.items()}
    velocity = {k: np.zeros(s) for k, s in SHAPES.items()}
    for round_, sizes in ((1, [40, 120, 7]), (2, [13, 50, 99])):
        results = client_results(rng, SHAPES, sizes)
        alg.aggregate(round_, results)
        avg = hand_weighted_average([r.update.values for r in results], sizes)
        for k in SHAPES:
            delta = theta[k] - avg[k].astype(np.float64)
            velocity[k] = beta * velocity[k] + delta
            theta[k] = (theta[k] - eta * velocity[k]).astype(np.float32).astype(np.float64)
        for k in SHAPES:
            np.testing.assert_allclose(alg.global_weights()[k], theta[k], rtol=1e-6, atol=1e-7)
            assert alg.global_weights()[k].dtype == np.float32
            np.testing.assert_allclose(alg.velocity[k], velocity[k], rtol=1e-6, atol=1e-7)
    # after two rounds momentum made a difference: plain FedAvg would give the last average
    assert not np.allclose(alg.global_weights()["fc.weight"], avg["fc.weight"])


def test_fedavgm_state_round_trips_through_state_dict():
    rng = np.random.default_rng(6)
    cfg = make_cfg("algorithm=fedavgm")
    a = build_algorithm(cfg, make_info(SHAPES))
    a.init_server({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, np.random.default_rng(0))
    a.aggregate(1, client_results(rng, SHAPES, [3, 4]))
    b = build_algorithm(cfg, make_info(SHAPES))
    b.load_state_dict(a.state_dict())
    second = client_results(rng, SHAPES, [5, 6])
    a.aggregate(2, second)
    b.aggregate(2, second)
    for k in SHAPES:
        np.testing.assert_array_equal(a.global_weights()[k], b.global_weights()[k])


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg():
    rng = np.random.default_rng(7)
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    m = build_algorithm(make_cfg("algorithm=fedavgm", "fedavgm.momentum=0", "fedavgm.server_lr=1"),
                        make_info(SHAPES))
    f = build_algorithm(make_cfg("algorithm=fedavg"), make_info(SHAPES))
    for alg in (m, f):
        alg.init_server({k: v.copy() for k, v in start.items()}, np.random.default_rng(0))
    for round_ in (1, 2, 3):
        results = client_results(rng, SHAPES, [10 * round_, 7, 33])
        m.aggregate(round_, results)
        f.aggregate(round_, results)
        for k in SHAPES:
            np.testing.assert_allclose(m.global_weights()[k], f.global_weights()[k], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ FedProx locally
@pytest.fixture(scope="module")
def local_setup():
    from fedmpi.models import build_model
    from fedmpi.training import LocalTrainer

    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4)
    cfg = make_cfg("local.batch_size=8", "local.lr=0.1", "local.epochs=2")
    trainer = LocalTrainer(model, cfg["local"])
    state = model.state_dict()
    shapes = {n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()}
    start = {n: state[n].detach().numpy().copy() for n in shapes}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return trainer, make_info(shapes), start, x, y


def local_result(local_setup, *overrides):
    trainer, info, start, x, y = local_setup
    alg = build_algorithm(make_cfg(*overrides), info)
    task = ClientTask(round=3, client_id=2, received=ModelUpdate({k: v.copy() for k, v in start.items()}),
                      state={}, x=x, y=y, seed=1234)
    return alg.local_update(task, trainer)


def test_fedprox_changes_the_local_result_and_mu_zero_is_fedavg(local_setup):
    start = local_setup[2]
    avg = local_result(local_setup, "algorithm=fedavg")
    again = local_result(local_setup, "algorithm=fedavg")
    prox0 = local_result(local_setup, "algorithm=fedprox", "fedprox.mu=0")
    prox = local_result(local_setup, "algorithm=fedprox", "fedprox.mu=2.0")
    assert avg.num_samples == 64 and avg.samples_processed == 128
    for name in start:
        # deterministic in the task seed, and mu = 0 is FedAvg bit for bit
        np.testing.assert_array_equal(again.update.values[name], avg.update.values[name])
        np.testing.assert_array_equal(prox0.update.values[name], avg.update.values[name])
    assert prox0.train_loss == avg.train_loss
    # training moved the model, and the proximal term changed where it went
    assert any(not np.array_equal(avg.update.values[n], start[n]) for n in start)
    assert any(not np.array_equal(prox.update.values[n], avg.update.values[n]) for n in start)

    def drift(r):
        return sum(float(np.sum((r.update.values[n].astype(np.float64) - start[n]) ** 2)) for n in start)

    # the proximal term pulls towards the starting point
    assert drift(prox) < drift(avg)


# ------------------------------------------------------------------------------ assign_clients
def loads(assignment, sizes):
    return {r: sum(sizes[c] for c in cs) for r, cs in assignment.items()}


def test_assign_clients_hand_example():
    sizes = {0: 100, 1: 60, 2: 50, 3: 40, 4: 10}
    # largest first to the least-loaded rank (ties: lowest rank):
    # 0->1 (100,0), 1->2 (100,60), 2->2 (100,110), 3->1 (140,110), 4->2 (140,120)
    assert assign_clients([0, 1, 2, 3, 4], sizes, [1, 2]) == {1: [0, 3], 2: [1, 2, 4]}
    assert assign_clients([3, 4], sizes, [1, 2, 3]) == {1: [3], 2: [4], 3: []}
    assert assign_clients([4, 0, 2], sizes, [0]) == {0: [0, 2, 4]}


@pytest.mark.parametrize("ranks", [[0], [1], [1, 2], [1, 2, 3], [1, 2, 3, 4, 5, 6, 7]])
def test_assign_clients_properties(ranks):
    rng = np.random.default_rng(len(ranks))
    for trial in range(20):
        sizes = {c: int(s) for c, s in enumerate(rng.integers(1, 1000, size=30))}
        clients = sorted(rng.choice(30, size=int(rng.integers(1, 15)), replace=False).tolist())
        a = assign_clients(clients, sizes, ranks)
        assert sorted(a) == sorted(ranks)
        flat = list(itertools.chain.from_iterable(a.values()))
        assert sorted(flat) == clients                            # every client exactly once
        assert all(cs == sorted(cs) for cs in a.values())
        # deterministic and independent of the order the clients are listed in
        shuffled = list(clients)
        rng.shuffle(shuffled)
        assert assign_clients(shuffled, sizes, ranks) == a
        assert assign_clients(clients, sizes, ranks) == a
        # balanced: greedy largest-first keeps the spread within the largest client's size
        load = loads(a, sizes)
        if len(clients) >= len(ranks):
            assert max(load.values()) - min(load.values()) <= max(sizes[c] for c in clients)
            assert all(cs for cs in a.values())


def test_assign_clients_balances_skewed_sizes():
    sizes = {0: 800, 1: 40, 2: 42, 3: 47, 4: 760, 5: 41, 6: 40, 7: 43}
    clients = list(range(8))
    a = assign_clients(clients, sizes, [1, 2])
    load = loads(a, sizes)
    total = sum(sizes.values())
    best = min(max(sum(sizes[c] for c in s), total - sum(sizes[c] for c in s))
               for k in range(9) for s in itertools.combinations(clients, k))
    # largest-first greedy is within 4/3 of the best split (Graham's bound) ...
    assert max(load.values()) <= 4 / 3 * best
    # ... and puts the two big clients on different ranks, unlike dealing clients out by id
    assert (0 in a[1]) != (4 in a[1])
    round_robin = {1: clients[0::2], 2: clients[1::2]}
    assert max(load.values()) < max(loads(round_robin, sizes).values())
