"""Tests of the sparse-training toolkit (fedmpi/sparsity.py) and of FedDST's readjustment
(fedmpi/algorithms/feddst_readjustment.py)."""
import math

import numpy as np
import pytest
import torch

from fedmpi.algorithms.feddst_readjustment import (
    cosine_readjust_fraction,
    prune_and_grow,
    readjustment_round,
    reprune_public,
    resolve_r_end,
    schedule_round,
)
from fedmpi.errors import ConfigError
from fedmpi.sparsity import apply_masks_torch, kept_counts, layer_densities, magnitude_masks

# Maskable weights of FedDST's CNNs (fedmpi/models/nets.py), in model order.
CIFAR10NET = {
    "conv1.weight": (6, 3, 5, 5),
    "conv2.weight": (16, 6, 5, 5),
    "fc1.weight": (120, 6400),
    "fc2.weight": (84, 120),
    "fc3.weight": (10, 84),
}
MNISTNET = {
    "conv1.weight": (10, 1, 5, 5),
    "conv2.weight": (20, 10, 5, 5),
    "fc1.weight": (50, 5120),
    "fc2.weight": (10, 50),
}


def _sizes(shapes):
    return {name: math.prod(shape) for name, shape in shapes.items()}


def _random_weights(shapes, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _zero_outside(weights, masks):
    """Zero, in place, every masked weight outside its mask."""
    for name, mask in masks.items():
        weights[name][~mask] = 0


def _same_masks(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- layer densities

@pytest.mark.parametrize("shapes", [CIFAR10NET, MNISTNET], ids=["cifar10net", "mnistnet"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_erk_global_density_matches_target(shapes, sparsity):
    densities = layer_densities(shapes, sparsity, "erk")
    sizes = _sizes(shapes)
    total = sum(sizes.values())
    assert list(densities) == list(shapes)  # model order kept
    assert all(0.0 < d <= 1.0 for d in densities.values())
    # The densities themselves hit 1-S up to float error ...
    assert sum(densities[n] * sizes[n] for n in shapes) == pytest.approx((1 - sparsity) * total,
                                                                          rel=1e-12)
    # ... and the integer counts within one weight per layer.
    counts = kept_counts(shapes, densities)
    assert abs(sum(counts.values()) - (1 - sparsity) * total) <= len(shapes)


def test_erk_small_layers_denser_than_big_ones():
    densities = layer_densities(CIFAR10NET, 0.8, "erk")
    # ERK score order (conv1 > fc2 > conv2 > fc1) must carry over to densities.
    assert densities["conv1.weight"] > densities["fc2.weight"] > densities["conv2.weight"]
    assert densities["conv2.weight"] > densities["fc1.weight"]
    assert densities["fc1.weight"] < 0.2  # the big layer pays for the small ones


def test_erk_density_proportional_to_score_for_uncapped_layers():
    densities = layer_densities(CIFAR10NET, 0.8, "erk")
    score = {n: sum(s) / math.prod(s) for n, s in CIFAR10NET.items()}
    uncapped = [n for n in CIFAR10NET if densities[n] < 1.0]
    ratios = [densities[n] / score[n] for n in uncapped]
    assert len(uncapped) == 4  # fc3 is capped at S = 0.8
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)


def test_erk_caps_first_small_layer_and_redistributes():
    # A tiny first layer whose uncapped ERK density would be far above 1.
    shapes = {"small": (4, 3), "mid": (64, 64), "big": (256, 1024)}
    sizes = _sizes(shapes)
    total = sum(sizes.values())
    score = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    sparsity = 0.9
    naive_epsilon = (1 - sparsity) * total / sum(score[n] * sizes[n] for n in shapes)
    assert naive_epsilon * score["small"] > 1.0  # the case really needs capping

    densities = layer_densities(shapes, sparsity, "erk")
    assert densities["small"] == 1.0
    assert max(densities.values()) <= 1.0
    # The capped layer's excess went to the others: same epsilon for both, and larger than
    # the naive one.
    epsilon = densities["mid"] / score["mid"]
    assert densities["big"] / score["big"] == pytest.approx(epsilon, rel=1e-12)
    assert epsilon > naive_epsilon
    assert sum(densities[n] * sizes[n] for n in shapes) == pytest.approx((1 - sparsity) * total)


def test_erk_caps_repeatedly_until_no_layer_exceeds_one():
    # Capping the smallest layer raises epsilon enough to push the next one over 1 too.
    shapes = {"a": (2, 2), "b": (8, 8), "c": (10, 12), "d": (512, 512)}
    densities = layer_densities(shapes, 0.5, "erk")
    assert densities["a"] == densities["b"] == 1.0
    assert all(d <= 1.0 for d in densities.values())
    sizes = _sizes(shapes)
    assert sum(densities[n] * sizes[n] for n in shapes) == pytest.approx(0.5 * sum(sizes.values()))


def test_uniform_gives_one_minus_sparsity_everywhere():
    densities = layer_densities(CIFAR10NET, 0.8, "uniform")
    assert densities == {n: pytest.approx(0.2) for n in CIFAR10NET}


@pytest.mark.parametrize("distribution", ["erk", "uniform", "erk_public"])
def test_zero_sparsity_is_dense(distribution):
    assert layer_densities(MNISTNET, 0.0, distribution) == {n: 1.0 for n in MNISTNET}


def test_erk_public_is_nearly_uniform_and_hits_target():
    densities = layer_densities(CIFAR10NET, 0.8, "erk_public")
    sizes = _sizes(CIFAR10NET)
    assert sum(densities[n] * sizes[n] for n in CIFAR10NET) == pytest.approx(0.2 * sum(sizes.values()))
    # Nearly uniform: every layer within 0.1 of 0.2, where the paper's ERK spans 0.19 to 1.
    assert all(abs(d - 0.2) < 0.1 for d in densities.values())
    assert densities["fc3.weight"] > densities["fc1.weight"]
    assert layer_densities(CIFAR10NET, 0.8, "erk")["fc3.weight"] == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_a_config_error(bad):
    with pytest.raises(ConfigError) as info:
        layer_densities(CIFAR10NET, bad)
    assert info.value.key == "sparsity"


def test_unknown_distribution_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        layer_densities(CIFAR10NET, 0.8, "er")
    assert info.value.key == "feddst.distribution"


def test_kept_counts_rounding_and_floor_of_one():
    shapes = {"a": (10,), "b": (3, 3), "c": (4,), "d": (7,)}
    counts = kept_counts(shapes, {"a": 0.25, "b": 0.01, "c": 1.0, "d": 0.0})
    assert counts == {"a": 3, "b": 1, "c": 4, "d": 0}  # 2.5 rounds half up; tiny > 0 keeps 1


# --------------------------------------------------------------------------- magnitude masks

def test_magnitude_masks_keep_exact_counts_and_top_magnitudes():
    weights = _random_weights(CIFAR10NET, seed=1)
    counts = kept_counts(CIFAR10NET, layer_densities(CIFAR10NET, 0.8))
    masks = magnitude_masks(weights, counts)
    assert list(masks) == list(CIFAR10NET)
    for name, mask in masks.items():
        assert mask.dtype == bool and mask.shape == CIFAR10NET[name]
        assert np.count_nonzero(mask) == counts[name]
        magnitude = np.abs(weights[name])
        if counts[name] < mask.size:
            assert magnitude[mask].min() >= magnitude[~mask].max()


def test_magnitude_masks_hand_example_with_ties_to_lower_index():
    weights = {"w": np.array([[0.5, -3.0, 1.0], [-1.0, 0.0, 2.0]], dtype=np.float32)}
    masks = magnitude_masks(weights, {"w": 3})
    # |w| ranks: 3.0 (1), 2.0 (5), then a tie 1.0 at flat 2 and 3: the lower index wins.
    np.testing.assert_array_equal(masks["w"], [[False, True, True], [False, False, True]])


def test_magnitude_masks_within_restricts_to_candidates():
    weights = {"w": np.array([0.0, 0.0, 5.0, 0.0, 1.0], dtype=np.float32)}
    within = {"w": np.array([False, True, False, True, True])}
    masks = magnitude_masks(weights, {"w": 2}, within=within)
    # Position 2 is larger but not a candidate; among candidates the zero tie goes to index 1.
    np.testing.assert_array_equal(masks["w"], [False, True, False, False, True])


def test_magnitude_masks_are_deterministic():
    weights = _random_weights(MNISTNET, seed=2)
    counts = kept_counts(MNISTNET, layer_densities(MNISTNET, 0.8))
    assert _same_masks(magnitude_masks(weights, counts), magnitude_masks(weights, counts))


def test_magnitude_masks_reject_bad_counts():
    with pytest.raises(ValueError):
        magnitude_masks({"w": np.ones(3, dtype=np.float32)}, {"w": 4})


# --------------------------------------------------------------------------- prune and grow

def _f32(values):
    return np.array(values, dtype=np.float32)


def _hand_example():
    weights = {"w": np.array([0.9, 0.1, 0.0, -0.5, 0.0, 0.3, 0.0, 0.0], dtype=np.float32),
               "bias": np.array([7.0], dtype=np.float32)}
    masks = {"w": np.array([True, True, False, True, False, True, False, False])}
    gradients = {"w": np.array([0.0, 9.0, 0.2, 0.0, -0.8, 0.0, 0.5, 0.1], dtype=np.float32)}
    return weights, masks, gradients


def test_prune_and_grow_hand_example_default_rule():
    weights, masks, gradients = _hand_example()
    before = {k: v.copy() for k, v in weights.items()}
    # 4 active, fraction 0.5 -> k = 2: prune |w| 0.1 (index 1) and 0.3 (index 5).
    # Candidates after pruning: 1, 2, 4, 5, 6, 7; largest |g|: 9.0 (index 1, just pruned) and
    # 0.8 (index 4).
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.5)
    np.testing.assert_array_equal(new_masks["w"], [True, True, False, True, True, False, False, False])
    np.testing.assert_array_equal(new_weights["w"], _f32([0.9, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(new_weights["bias"], [7.0])
    assert list(new_weights) == ["w", "bias"]
    for name in before:  # inputs untouched
        np.testing.assert_array_equal(weights[name], before[name])
    np.testing.assert_array_equal(masks["w"], [True, True, False, True, False, True, False, False])


def test_prune_and_grow_hand_example_excluding_just_pruned():
    weights, masks, gradients = _hand_example()
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.5, regrow_pruned=False)
    # Index 1 was active before, so it cannot come back: growth picks 0.8 (4) and 0.5 (6).
    np.testing.assert_array_equal(new_masks["w"], [True, False, False, True, True, False, True, False])
    np.testing.assert_array_equal(new_weights["w"], _f32([0.9, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0]))


def test_prune_and_grow_public_code_growth_can_reset_active_weights():
    weights, masks, gradients = _hand_example()
    gradients["w"][0] = 5.0  # active weight 0.9 now has the second-largest |g|
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.5,
                                            grow_over_all_positions=True)
    # Pruned 1 and 5; top-2 |g| over all positions are 1 and 0: weight 0 is reset to 0.
    np.testing.assert_array_equal(new_masks["w"], [True, True, False, True, False, False, False, False])
    np.testing.assert_array_equal(new_weights["w"], _f32([0.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0]))
    assert np.count_nonzero(new_masks["w"]) == 3  # below the 4 active before


@pytest.mark.parametrize("regrow_pruned", [True, False])
def test_prune_and_grow_invariants_on_random_layers(regrow_pruned):
    rng = np.random.default_rng(3)
    for trial in range(30):
        shapes = {f"l{i}": tuple(rng.integers(1, 12, size=rng.integers(1, 4))) for i in range(3)}
        # Quantised so magnitude and gradient ties occur; weights kept nonzero so that a
        # position surviving the prune step is told apart from a grown one (weight 0).
        weights = {n: np.round(w, 1) for n, w in _random_weights(shapes, seed=100 + trial).items()}
        weights = {n: np.where(w == 0, np.float32(0.1), w) for n, w in weights.items()}
        gradients = {n: np.round(rng.standard_normal(s), 1) for n, s in shapes.items()}
        densities = {n: float(rng.uniform(0.05, 0.95)) for n in shapes}
        masks = magnitude_masks(weights, kept_counts(shapes, densities))
        _zero_outside(weights, masks)
        fraction = float(rng.uniform(0, 1))

        new_weights, new_masks = prune_and_grow(weights, masks, gradients, fraction,
                                                regrow_pruned=regrow_pruned)
        for name in shapes:
            old, new, w_new = masks[name], new_masks[name], new_weights[name]
            if old.all():  # a dense layer is left alone
                assert new.all()
                np.testing.assert_array_equal(w_new, weights[name])
                continue
            active = int(np.count_nonzero(old))
            k = math.floor(fraction * active)
            if not regrow_pruned:
                k = min(k, old.size - active)
            survivors = new & (w_new != 0)  # kept by the prune step, value unchanged
            pruned = old & ~survivors
            grown = new & ~survivors
            assert np.count_nonzero(new) == active  # active count back to target
            assert np.count_nonzero(pruned) == k
            assert np.count_nonzero(grown) == k
            assert not np.any(survivors & ~old)
            np.testing.assert_array_equal(w_new[survivors], weights[name][survivors])
            assert np.all(w_new[~new] == 0) and np.all(w_new[grown] == 0)
            # Pruned = the k smallest |w| among the active ones.
            magnitude = np.abs(weights[name])
            if k and active - k:
                assert magnitude[survivors].min() >= magnitude[pruned].max()
            # Grown = the k largest |g| among the allowed candidates.
            candidates = ~survivors if regrow_pruned else ~old
            assert not np.any(grown & ~candidates)
            g = np.abs(gradients[name])
            passed_over = candidates & ~grown
            if k and passed_over.any():
                assert g[grown].min() >= g[passed_over].max()


@pytest.mark.parametrize("shapes, dense", [(MNISTNET, "fc2.weight"), (CIFAR10NET, "fc3.weight")],
                         ids=["mnistnet", "cifar10net"])
@pytest.mark.parametrize("variant", [{}, {"regrow_pruned": False}, {"grow_over_all_positions": True}],
                         ids=["default", "no-regrow", "grow-over-all"])
def test_prune_and_grow_leaves_layers_erk_made_dense_alone(shapes, dense, variant):
    densities = layer_densities(shapes, 0.8, "erk")
    assert densities[dense] == 1.0  # the classifier ERK keeps dense
    counts = kept_counts(shapes, densities)
    weights = _random_weights(shapes, seed=8)
    masks = magnitude_masks(weights, counts)
    _zero_outside(weights, masks)
    gradients = _random_weights(shapes, seed=9)
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.5, counts=counts, **variant)
    assert new_masks[dense].all()
    np.testing.assert_array_equal(new_weights[dense], weights[dense])  # trained weights kept
    assert np.count_nonzero(new_weights[dense]) == weights[dense].size
    # the sparse layers did readjust
    assert all(not np.array_equal(new_masks[n], masks[n]) for n in shapes if n != dense)


def test_prune_and_grow_counts_equal_to_active_change_nothing():
    weights, masks, gradients = _hand_example()
    plain = prune_and_grow(weights, masks, gradients, 0.5)
    counted = prune_and_grow(weights, masks, gradients, 0.5, counts={"w": 4})
    assert _same_masks(plain[1], counted[1])
    for name in plain[0]:
        np.testing.assert_array_equal(plain[0][name], counted[0][name])


def test_prune_and_grow_regrows_a_short_layer_to_its_count():
    weights, masks, gradients = _hand_example()  # 4 active; the target is 5
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.5, counts={"w": 5})
    # prune k = 2 (indices 1 and 5), grow 5 - 2 = 3: largest |g| among 1, 2, 4, 5, 6, 7 are
    # 9.0 (1), 0.8 (4) and 0.5 (6)
    np.testing.assert_array_equal(new_masks["w"], [True, True, False, True, True, False, True, False])
    np.testing.assert_array_equal(new_weights["w"], _f32([0.9, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0]))
    # without regrowing just-pruned weights there are enough old inactive positions to reach 5
    _, strict = prune_and_grow(weights, masks, gradients, 0.5, counts={"w": 5}, regrow_pruned=False)
    np.testing.assert_array_equal(strict["w"], [True, False, True, True, True, False, True, False])


def test_prune_and_grow_tie_break_is_by_flat_index():
    weights = {"w": np.array([0.2, 0.2, 0.2, 0.0, 0.0, 0.0], dtype=np.float32)}
    masks = {"w": np.array([True, True, True, False, False, False])}
    gradients = {"w": np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)}
    _, new_masks = prune_and_grow(weights, masks, gradients, 0.34)  # k = 1
    # Ties: the highest index is pruned (lower ranks first among equals), the lowest grown.
    np.testing.assert_array_equal(new_masks["w"], [True, True, False, True, False, False])


def test_prune_and_grow_fraction_zero_changes_nothing():
    weights = _random_weights(MNISTNET, seed=4)
    masks = magnitude_masks(weights, kept_counts(MNISTNET, layer_densities(MNISTNET, 0.8)))
    _zero_outside(weights, masks)
    gradients = _random_weights(MNISTNET, seed=5)
    new_weights, new_masks = prune_and_grow(weights, masks, gradients, 0.0)
    assert _same_masks(new_masks, masks)
    for name in weights:
        np.testing.assert_array_equal(new_weights[name], weights[name])


def test_prune_and_grow_keeps_cifar10net_counts():
    weights = _random_weights(CIFAR10NET, seed=6)
    counts = kept_counts(CIFAR10NET, layer_densities(CIFAR10NET, 0.8))
    masks = magnitude_masks(weights, counts)
    _zero_outside(weights, masks)
    gradients = _random_weights(CIFAR10NET, seed=7)
    _, new_masks = prune_and_grow(weights, masks, gradients, 0.05)
    assert {n: int(np.count_nonzero(m)) for n, m in new_masks.items()} == counts
    changed = sum(int(np.count_nonzero(new_masks[n] & ~masks[n])) for n in counts)
    assert 0 < changed <= sum(math.floor(0.05 * c) for c in counts.values())


def test_prune_and_grow_rejects_bad_fraction():
    weights, masks, gradients = _hand_example()
    with pytest.raises(ValueError):
        prune_and_grow(weights, masks, gradients, 1.5)


# --------------------------------------------------------------------------- cosine schedule

def test_cosine_schedule_values():
    assert cosine_readjust_fraction(0.05, 0, 100) == pytest.approx(0.05)
    assert cosine_readjust_fraction(0.05, 50, 100) == pytest.approx(0.025)
    assert cosine_readjust_fraction(0.05, 25, 100) == pytest.approx(0.025 * (1 + math.sqrt(0.5)))
    assert cosine_readjust_fraction(0.05, 100, 100) == 0.0
    assert cosine_readjust_fraction(0.05, 250, 100) == 0.0
    values = [cosine_readjust_fraction(0.05, r, 100) for r in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing


def test_cosine_schedule_rejects_bad_alpha():
    with pytest.raises(ConfigError) as info:
        cosine_readjust_fraction(1.5, 0, 10)
    assert info.value.key == "feddst.alpha"


# --------------------------------------------------------------------------- torch masking

def test_apply_masks_torch_keeps_pruned_weights_zero_after_sgd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    names = ["0.weight", "2.weight"]
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
    shapes = {n: w.shape for n, w in weights.items()}
    masks = magnitude_masks(weights, kept_counts(shapes, {n: 0.5 for n in names}))
    apply_masks_torch(model, masks)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    inputs, labels = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = dict(model.named_parameters())
    moved_off_zero = False
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        # The step itself moves pruned weights (dense gradient, momentum) ...
        moved_off_zero |= any(bool((params[n].detach()[~torch.from_numpy(masks[n])] != 0).any())
                              for n in names)
        apply_masks_torch(model, masks)
        # ... and re-applying the mask puts them back to exactly 0.
        for n in names:
            pruned = ~torch.from_numpy(masks[n])
            assert torch.all(params[n].detach()[pruned] == 0)
    assert moved_off_zero
    for n in names:  # the kept weights did train
        kept = torch.from_numpy(masks[n])
        assert not torch.equal(params[n].detach()[kept], start[n][kept])


def test_apply_masks_torch_accepts_named_pairs_and_torch_masks():
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 1], layer.weight[1, 0] = float("nan"), float("inf")
    mask = torch.tensor([[True, False, True], [False, False, True]])
    apply_masks_torch(layer.named_parameters(), {"weight": mask})
    assert torch.all(layer.weight.detach()[~mask] == 0)  # NaN and inf outside the mask become 0
    kept = layer.weight.detach()[mask]
    apply_masks_torch({"weight": layer.weight}, {"weight": mask.numpy()})  # a mapping, a numpy mask
    assert torch.equal(layer.weight.detach()[mask], kept)
    with pytest.raises(KeyError):
        apply_masks_torch(layer, {"missing.weight": mask})


def test_magnitude_masks_tiebreak_orders_equal_magnitudes_by_votes():
    """The FedDST server's re-prune: grown weights arrive as zeros; the most-voted one wins."""
    weights = {"w": np.array([0.5, 0.0, 0.0, -0.3, 0.0, 0.0], dtype=np.float32)}
    within = {"w": np.array([True, True, True, True, False, True])}
    votes = {"w": np.array([1.0, 2.0, 5.0, 1.0, 9.0, 3.0])}
    with_votes = magnitude_masks(weights, {"w": 3}, within=within, tiebreak=votes)["w"]
    np.testing.assert_array_equal(with_votes, [True, False, True, True, False, False])
    by_index = magnitude_masks(weights, {"w": 3}, within=within)["w"]
    np.testing.assert_array_equal(by_index, [True, True, False, True, False, False])
    # magnitude still comes first: a larger |w| beats any number of votes
    weights["w"][5] = 0.4
    np.testing.assert_array_equal(magnitude_masks(weights, {"w": 3}, within=within, tiebreak=votes)["w"],
                                  [True, False, False, True, False, True])


# --------------------------------------------------------------------------- public server re-prune

def test_reprune_public_can_fall_below_the_target():
    """Zeros outside the union and grown (still zero) weights inside it rank alike: the 4
    smallest |w| over the whole tensor are the zeros at 0, 2, 3 and 5; 2 and 5 were not in the
    union, so only 3 positions stay where the target is 4."""
    weights = {"w": _f32([0.0, 0.5, 0.0, 0.0, -0.2, 0.0, 0.9, 0.0])}
    union = {"w": np.array([True, True, False, True, True, False, True, False])}
    masks = reprune_public(weights, union, {"w": 4})
    np.testing.assert_array_equal(masks["w"], [False, True, False, False, True, False, True, False])
    assert np.count_nonzero(masks["w"]) == 3
    # the paper's re-prune keeps the target: magnitude within the union, then a grown zero
    paper = magnitude_masks(weights, {"w": 4}, within=union)
    assert np.count_nonzero(paper["w"]) == 4
    # when the zeros do not outnumber n - c the result is exactly the target
    exact = reprune_public(weights, union, {"w": 3})
    np.testing.assert_array_equal(exact["w"], [False, True, False, False, True, False, True, False])


def test_reprune_public_only_when_the_union_is_denser_than_the_target():
    weights = {"a": _f32([0.1, 0.2, 0.3, 0.0]), "b": _f32([0.4, 0.0, 0.0, 0.0])}
    union = {"a": np.array([True, True, True, False]), "b": np.array([True, False, False, False])}
    # a holds 3 (its count is 2), b holds 1 (count 2): 4 in all, not above the total 4
    kept = reprune_public(weights, union, {"a": 2, "b": 2})
    assert _same_masks(kept, union) and kept["a"] is not union["a"]
    # one more in the union: every layer is cut to its count by |w| over the whole tensor
    union["b"][1] = True
    cut = reprune_public(weights, union, {"a": 2, "b": 2})
    np.testing.assert_array_equal(cut["a"], [False, True, True, False])
    # b: n - c = 2 smallest are the zeros at 1 and 2 (lower index first), so its grown zero at 1
    # goes while the zero at 3 stays out: b falls to 1 below its count of 2
    np.testing.assert_array_equal(cut["b"], [True, False, False, False])


def test_reprune_public_leaves_dense_and_empty_layers_as_the_union():
    weights = {"d": _f32([0.1, 0.0, 0.3]), "s": _f32([0.5, 0.2, 0.1, 0.0])}
    union = {"d": np.ones(3, dtype=bool), "s": np.ones(4, dtype=bool)}
    masks = reprune_public(weights, union, {"d": 3, "s": 1})
    assert masks["d"].all()  # c = n: nothing to prune, even the zero stays
    np.testing.assert_array_equal(masks["s"], [True, False, False, False])


# --------------------------------------------------------------------------- readjustment schedule

@pytest.mark.parametrize("rule, every, r_end, rounds", [
    ("paper", 5, 10, [5]),
    ("paper", 2, 5, [2, 4]),
    ("paper", 10, 10, []),          # the old default: r % 10 == 0 and r < 10 never holds
    ("public", 5, 10, [2, 7]),      # server_round s = r - 1 in {1, 6}
    ("public", 10, 10, [2]),
    ("public", 1, 4, [1, 2, 3, 4]),  # (0 - 1) % 1 == 0: the code's first round readjusts too
])
def test_readjustment_rounds(rule, every, r_end, rounds):
    assert [r for r in range(1, 31) if readjustment_round(r, every, r_end, rule)] == rounds


def test_schedule_round_and_r_end():
    assert schedule_round(5, "paper") == 5 and schedule_round(5, "public") == 4
    with pytest.raises(ConfigError) as info:
        schedule_round(5, "code")
    assert info.value.key == "feddst.readjust_rule"
    assert resolve_r_end(-1, 21) == 10 and resolve_r_end(7, 20) == 7


def test_remasker_gives_masked_fills_bits_and_positive_zeros():
    """The trainer's fused re-masking (p <- 0 + p*m) against masked_fill_: the same bits for
    finite values, +0.0 (not -0.0) outside the mask; a kept -0.0 becomes +0.0."""
    import torch

    from fedmpi.sparsity import Remasker

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=generator)
    bias = torch.randn(48, generator=generator)
    mask = torch.rand(64, 48, generator=generator) < 0.3
    kept, dropped = tuple(mask.nonzero()[0].tolist()), tuple((~mask).nonzero()[0].tolist())
    weight[kept] = -0.0
    weight[dropped] = -2.5                                # a dropped negative entry becomes +0.0
    expected = weight.clone().masked_fill_(~mask, 0)
    expected[kept] = 0.0
    params = {"w": weight, "b": bias}
    before_bias = bias.clone()
    Remasker(params, {"w": mask.numpy()})()
    assert torch.equal(weight.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(bias, before_bias)
    with pytest.raises(ValueError, match="mask shape"):
        Remasker(params, {"b": np.ones(3, bool)})
