"""The reproducible fixed-point sum (fedmpi/aggregation ``FixedPointSum``) and worker-side
aggregation (``aggregation.sum: fixed_point``, ``aggregation.where: workers``).

Unit level: the sum against a hand computation and exact ``Fraction`` arithmetic, masks and
missing policies, grouping invariance, refused inputs. Under mpiexec (``-m mpi``): the two phases
over real ranks. End to end: ``where=workers`` at P = 1, 2, 4 has the bits of ``where=server``,
and fixed point agrees with float64 within the stated bound.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from fedmpi.aggregation import (FIXED_POINT_BITS, MAX_CONTRIBUTIONS, NO_SUMMAND, FixedPointSum, RoundSums,
                                average_over_holders, fixed_point_average)
from fedmpi.algorithms import ALGORITHMS, Algorithm, ClientResult, ModelInfo, build_algorithm
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.update import ModelUpdate

from helpers import BATCH_SCRIPT, fedmpi, mlp_parameter_count, needs_mpiexec, same_bits, write_config

B = FIXED_POINT_BITS


# ------------------------------------------------------------------------------ helpers
def random_updates(rng, shapes, count, *, masked=(), density=0.6, spread=0.0):
    """``count`` uploads of float32 tensors; tensors in ``masked`` carry a random mask (zeros
    outside it, as decoded). ``spread`` > 0 scales every value by 2^U(−spread, spread)."""
    updates = []
    for _ in range(count):
        values, masks = {}, {}
        for name, shape in shapes.items():
            v = rng.standard_normal(shape)
            if spread:
                v *= 2.0 ** rng.uniform(-spread, spread, shape)
            v = v.astype(np.float32)
            if name in masked:
                masks[name] = rng.random(shape) < density
                v[~masks[name]] = 0
            values[name] = v
        updates.append(ModelUpdate(values, masks))
    return updates


def grouped_average(shapes, updates, weights, groups, reference, missing):
    """The two phases with the uploads split into ``groups`` (lists of indices): what the ranks do
    with MPI MAX and SUM, done here with numpy."""
    summer = FixedPointSum(shapes)
    scales = [summer.scales([updates[k] for k in g], [weights[k] for k in g]) for g in groups]
    combined = np.maximum.reduce(scales)
    sums = sum(summer.partial_sums([updates[k] for k in g], [weights[k] for k in g], combined) for g in groups)
    return summer.average(sums, combined, reference, missing)


def assert_same_tensors(a: dict, b: dict):
    assert list(a) == list(b)
    for name, value in a.items():
        assert same_bits(value, b[name]), f"{name}: max |diff| {np.abs(value - b[name]).max()}"


def exact_average(updates, weights, name, i):
    """Σ w·m·θ / Σ w·m at flat element i of ``name`` in exact rationals (None: nobody holds it)."""
    numerator, votes = Fraction(0), 0
    for update, w in zip(updates, weights):
        mask = update.masks.get(name)
        if mask is not None and not mask.reshape(-1)[i]:
            continue
        numerator += w * Fraction(float(update.values[name].reshape(-1)[i]))
        votes += w
    return (numerator / votes if votes else None), votes


SHAPES = {"w": (5, 7), "b": (7,), "s": ()}


# ------------------------------------------------------------------------------ the sum itself
def test_fixed_point_sum_matches_a_hand_computation():
    # element 0: x = 1·0.75 and 3·0.5 = 1.5 → e = 1 (1.5 < 2^1), q = 0.75·2^41 + 1.5·2^41,
    # numerator = 2.25 exactly, votes 4, average 0.5625
    # element 1: x = 1·float32(−0.1) and 3·float32(0.3), not dyadic: truncation shows
    a = ModelUpdate({"t": np.array([0.75, -0.1], np.float32)})
    b = ModelUpdate({"t": np.array([0.5, 0.3], np.float32)})
    summer = FixedPointSum({"t": (2,)})
    scales = summer.scales([a, b], [1, 3])
    assert scales.dtype == np.int16 and scales.tolist() == [1, 0, 0]   # exponents, then the mask flag
    sums = summer.partial_sums([a, b], [1, 3], scales)
    x1 = [1 * float(np.float32(-0.1)), 3 * float(np.float32(0.3))]
    e1 = max(math.frexp(x)[1] for x in x1)
    assert scales[1] == e1 == 0
    q1 = [int(x * 2.0 ** (B - e1)) for x in x1]          # int() truncates toward zero
    assert sums.tolist() == [3 * 2 ** 39 + 3 * 2 ** 40, sum(q1), 4]  # numerators, then one vote count
    averaged, votes = summer.average(sums, scales, {"t": np.zeros(2, np.float32)}, "zero")
    assert averaged["t"][0] == np.float32(0.5625)
    assert averaged["t"][1] == np.float32(float(sum(q1)) * 2.0 ** (e1 - B) / 4)
    assert votes["t"].tolist() == [4.0, 4.0]


def test_fixed_point_sum_is_within_its_bound_of_the_exact_rational_sum():
    """Per element |result − exact| < K·2^(e−B)/votes (truncation) + float64 rounding, with a
    float64 reference so the float32 cast does not hide the error; masks, a wide dynamic range,
    and elements held by nobody (missing="keep" keeps the reference there)."""
    rng = np.random.default_rng(11)
    shapes = {"w": (6, 9), "b": (9,)}
    updates = random_updates(rng, shapes, 7, masked=("w",), density=0.4, spread=40)
    weights = [int(w) for w in rng.integers(0, 600, size=7)]
    weights[2] = 0
    reference = {n: rng.standard_normal(s) for n, s in shapes.items()}         # float64
    averaged, votes = fixed_point_average(updates, weights, reference, "keep")
    scales = FixedPointSum(shapes).scales(updates, weights)
    offset = 0
    nobody = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        for i in range(size):
            exact, exact_votes = exact_average(updates, weights, name, i)
            got = averaged[name].reshape(-1)[i]
            assert votes[name].reshape(-1)[i] == exact_votes
            if exact is None:
                nobody += 1
                assert got == reference[name].reshape(-1)[i]
                continue
            e = int(scales[offset + i])
            summands = [abs(w * float(u.values[name].reshape(-1)[i])) for u, w in zip(updates, weights)]
            truncation = Fraction(len(updates)) * Fraction(2) ** (e - B) / exact_votes if e != NO_SUMMAND else 0
            rounding = Fraction(2) ** -52 * (Fraction(sum(summands)) / exact_votes + abs(exact))
            assert abs(Fraction(float(got)) - exact) <= truncation + rounding, (name, i)
        offset += size
    assert nobody > 0   # the masks left some elements to nobody


def test_fixed_point_agrees_with_float64_within_one_float32_ulp():
    """The precision bound against the float64 sum (docs/performance.md): before the cast both
    are within K·2^(e−B)/votes + float64 rounding of the exact average, so after the cast to
    float32 they are equal or one float32 ulp apart."""
    rng = np.random.default_rng(3)
    shapes = {"w": (40, 50), "b": (50,)}
    updates = random_updates(rng, shapes, 20, masked=("w",), spread=3)
    weights = [int(w) for w in rng.integers(1, 2000, size=20)]
    reference = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    fixed, fixed_votes = average_over_holders(updates, weights, reference, "zero", sum_mode="fixed_point")
    plain, plain_votes = average_over_holders(updates, weights, reference, "zero")
    assert_same_tensors(fixed_votes, plain_votes)
    for name in shapes:
        gap = np.abs(fixed[name].astype(np.float64) - plain[name])
        assert np.all(gap <= np.spacing(np.abs(plain[name]))), name
    wide = {n: np.zeros(s) for n, s in shapes.items()}      # float64 results: the bound itself
    fixed64, _ = average_over_holders(updates, weights, wide, "zero", sum_mode="fixed_point")
    plain64, votes = average_over_holders(updates, weights, wide, "zero")
    scales = FixedPointSum(shapes).scales(updates, weights)
    offset = 0
    for name, shape in shapes.items():
        e = scales[offset:offset + math.prod(shape)].astype(np.float64).reshape(shape)
        offset += math.prod(shape)
        held = votes[name] > 0
        magnitude = sum(w * np.abs(u.values[name].astype(np.float64)) for u, w in zip(updates, weights))
        bound = len(updates) * 2.0 ** (e - B) / np.where(held, votes[name], 1) \
            + 2.0 ** -50 * magnitude / np.where(held, votes[name], 1)
        assert np.all(np.abs(fixed64[name] - plain64[name])[held] <= bound[held]), name


def test_missing_policies_dtypes_and_votes_match_average_over_holders():
    """Dyadic values (exact in both sums): fixed point gives average_over_holders' bits, for
    "keep" and "zero", float and integer references, masked and unmasked tensors, a 0-d tensor."""
    rng = np.random.default_rng(5)
    shapes = {"w": (4, 6), "i": (6,), "s": ()}
    updates = []
    for k in range(4):
        values = {n: (rng.integers(-64, 64, size=s) / 8).astype(np.float32) for n, s in shapes.items()}
        masks = {"w": rng.random((4, 6)) < 0.3} if k != 1 else {}
        values["w"] = np.where(masks["w"], values["w"], 0).astype(np.float32) if masks else values["w"]
        updates.append(ModelUpdate(values, masks))
    updates[1].values.pop("w")      # one upload lacks a tensor
    weights = [3, 1, 4, 2]
    reference = {"w": rng.standard_normal((4, 6)).astype(np.float32), "i": np.arange(6, dtype=np.int32),
                 "s": np.float32(7.5) * np.ones((), np.float32)}
    for missing in ("keep", "zero"):
        want = average_over_holders(updates, weights, reference, missing)
        got = average_over_holders(updates, weights, reference, missing, sum_mode="fixed_point")
        for a, b in zip(want, got):
            assert_same_tensors(a, b)
        assert got[0]["i"].dtype == np.int32 and got[0]["w"].dtype == np.float32
    assert np.any(want[1]["w"] == 0)   # some element held by nobody: the policies were exercised


def test_all_zero_elements_stay_exactly_zero_and_do_not_widen_the_grid():
    tiny = np.float32(2.0 ** -30)
    a = ModelUpdate({"t": np.array([0, 0, tiny, -0.0], np.float32)})
    b = ModelUpdate({"t": np.array([0, 3, 0, 0], np.float32)})
    summer = FixedPointSum({"t": (4,)})
    scales = summer.scales([a, b], [5, 1])
    # zeros take no part in the maximum: element 2's grid is its one nonzero summand's
    assert scales[:4].tolist() == [NO_SUMMAND, 2, math.frexp(5 * float(tiny))[1], NO_SUMMAND]
    averaged, votes = summer.average(summer.partial_sums([a, b], [5, 1], scales), scales,
                                     {"t": np.ones(4, np.float32)}, "keep")
    assert averaged["t"].tolist() == [0.0, 0.5, float(np.float32(5 * float(tiny) / 6)), 0.0]
    assert votes["t"].tolist() == [6.0] * 4     # zeros are held: they count, and average to exactly 0
    assert not np.signbit(averaged["t"][3])


def test_grouping_never_changes_a_bit(grid_path):
    """Random summands split into random groups (some empty), in random orders: the two phases
    give the all-at-once result bit for bit."""
    rng = np.random.default_rng(7)
    shapes = {"w": (30, 20), "b": (20,), "s": ()}
    for trial in range(6):
        count = int(rng.integers(1, 25))
        updates = random_updates(rng, shapes, count, masked=("w",) if trial % 2 else (), spread=20)
        weights = [int(w) for w in rng.integers(0, 5000, size=count)]
        reference = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        missing = ("keep", "zero")[trial % 2]
        whole = fixed_point_average(updates, weights, reference, missing)
        for _ in range(3):
            order = rng.permutation(count)
            cuts = np.sort(rng.integers(0, count + 1, size=int(rng.integers(0, 5))))
            groups = [g.tolist() for g in np.split(order, cuts)]
            got = grouped_average(shapes, updates, weights, groups, reference, missing)
            for a, b in zip(whole, got):
                assert_same_tensors(a, b)


@pytest.fixture(params=[None, 97], ids=["chunk-default", "chunk-97"])
def chunk(request, monkeypatch):
    """The sums' chunk size (fedmpi/aggregation/quantise.py ``CHUNK``); 97 splits these tests'
    tensors into several chunks and a ragged last one, as a model's tensors are."""
    import fedmpi.aggregation.quantise as quantise
    if request.param is not None:
        monkeypatch.setattr(quantise, "CHUNK", request.param)
    return request.param


@pytest.fixture(params=["native", "numpy"])
def grid_path(request, monkeypatch):
    """Which code makes the pass over the uploads (quantise.py ``grid_pass``): grid_pass.c
    (skipped where it is not built) or numpy and torch."""
    import fedmpi.aggregation.quantise as quantise
    if request.param == "numpy":
        monkeypatch.setattr(quantise.GRID_PASS, "loaded", False)
    elif quantise.GRID_PASS.get() is None:
        pytest.skip(f"grid_pass.c is not usable here: {quantise.GRID_PASS.why}")
    return request.param


def test_both_grid_passes_give_the_same_bits(chunk):
    """grid_pass.c against numpy and torch on values spread over 2^±60 with zeros, −0, subnormals,
    repeated and zero weights, a ragged size: every array bit for bit."""
    import fedmpi.aggregation.quantise as quantise
    if quantise.GRID_PASS.get() is None:
        pytest.skip(f"grid_pass.c is not usable here: {quantise.GRID_PASS.why}")
    rng = np.random.default_rng(5)
    size, count = 1000, 13
    thetas = [(rng.standard_normal(size) * 2.0 ** rng.uniform(-60, 60, size)).astype(np.float32)
              for _ in range(count)]
    for t in thetas:
        t[rng.integers(0, size, 30)] = 0
        t[rng.integers(0, size, 10)] = np.float32(-0.0)
        t[rng.integers(0, size, 10)] = np.float32(2.0 ** -140)
    weights = [0, 2 ** 29, 7, 7, 1, 0, 60, 7, 3000, 1, 1, 2, 5]
    native = quantise.grid_pass(thetas, weights)
    quantise.GRID_PASS.loaded, kept = False, quantise.GRID_PASS.loaded
    try:
        numpy_pass = quantise.grid_pass(thetas, weights)
    finally:
        quantise.GRID_PASS.loaded = kept
    assert native.largest.tobytes() == numpy_pass.largest.tobytes()
    assert native.total.tobytes() == numpy_pass.total.tobytes()
    assert np.array_equal(native.smallest, numpy_pass.smallest)     # a −0 minimum equals +0
    assert native.finite and numpy_pass.finite
    # against the definitions, in float64 upload by upload
    assert np.array_equal(native.largest, np.max([np.abs(t.astype(np.float64)) * w
                                                  for t, w in zip(thetas, weights)], axis=0))
    summed = [t for t, w in zip(thetas, weights) if w]
    assert np.array_equal(native.smallest, np.min(np.abs(summed), axis=0))


def test_scales_are_the_exponents_of_the_largest_weighted_summand(chunk, grid_path):
    # against the definition, in float64 upload by upload: repeated and distinct weights (the
    # float32 running maximum per weight), masks (ignored outside), a missing tensor, float64 and
    # integer tensors (taken in float64), zero weights; with chunks of 97 elements too
    rng = np.random.default_rng(11)
    shapes = {"a": (6, 50), "m": (400,), "d": (3,), "i": (4,)}
    updates = random_updates(rng, {"a": (6, 50), "m": (400,)}, 9, masked=("m",), spread=40)
    for k, update in enumerate(updates):
        update.values["m"][~update.masks["m"]] = np.float32(1e30)   # outside the mask: never counted
        update.values["d"] = rng.standard_normal(3) * 2.0 ** rng.uniform(-60, 60, 3)
        update.values["i"] = rng.integers(-1000, 1000, 4)
    del updates[4].values["a"]
    weights = [60, 7, 60, 0, 60, 2 ** 29, 7, 1, 60]
    scales = FixedPointSum(shapes).scales(updates, weights)
    start = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        largest = np.zeros(size)
        for update, w in zip(updates, weights):
            if name not in update.values:
                continue
            x = np.abs(np.asarray(update.values[name], dtype=np.float64).reshape(-1) * w)
            if name in update.masks:
                x[~update.masks[name].reshape(-1)] = 0
            largest = np.maximum(largest, x)
        expected = np.where(largest == 0, NO_SUMMAND, np.frexp(largest)[1])
        assert np.array_equal(scales[start:start + size], expected.astype(np.int16)), name
        start += size
    assert list(scales[start:]) == [0, 1, 0, 0]    # only "m" is masked


def test_own_scales_replace_the_per_upload_range_check_with_the_same_integers():
    rng = np.random.default_rng(12)
    shapes = {"a": (5, 4), "m": (30,)}
    updates = random_updates(rng, shapes, 10, masked=("m",), spread=20)
    weights = [int(w) for w in rng.integers(1, 500, 10)]
    summer = FixedPointSum(shapes)
    groups = [[0, 3, 4], [1, 2, 5, 6, 7], [8, 9]]
    own = [summer.scales([updates[k] for k in g], [weights[k] for k in g]) for g in groups]
    combined = np.maximum.reduce(own)
    checked = [summer.partial_sums([updates[k] for k in g], [weights[k] for k in g], combined) for g in groups]
    trusted = [summer.partial_sums([updates[k] for k in g], [weights[k] for k in g], combined, own_scales=o)
               for g, o in zip(groups, own)]
    for a, b in zip(checked, trusted):
        assert same_bits(a, b)
    whole = summer.partial_sums(updates, weights, combined)
    assert same_bits(sum(trusted), whole)
    # a group's own scales above the round's: refused, not summed off the grid
    with pytest.raises(ValueError, match="below this group's own"):
        summer.partial_sums([updates[k] for k in groups[0]], [weights[k] for k in groups[0]], own[1],
                            own_scales=own[0])


def test_the_on_grid_sum_gives_the_truncating_sums_integers(monkeypatch, chunk, grid_path):
    """With trusted scales, unmasked float32 tensors take one float64 add per upload where no
    summand leaves the grid (fedmpi/aggregation/quantise.py ``_on_grid_sum``) and redo the other elements:
    the integers of the per-upload multiply-truncate-add path, here on values spread over 2^±60
    with zeros, −0, subnormals and values 2^-25 below their neighbours (off the grid), weights
    from 0 to 2^29, packed uploads sharing one mask, and a group beyond 2^11 uploads (the
    truncating path again); with chunks of 97 elements too."""
    import fedmpi.aggregation.fixed_point as fixed_point
    import fedmpi.aggregation.quantise as quantise

    # how often the one-add path ran, and how many elements it handed back to the truncating one
    calls = {"on grid": 0, "redone": 0}
    on_grid_sum, off_grid_sum = quantise._on_grid_sum, quantise._off_grid_sum

    def counted_on_grid(*args):
        calls["on grid"] += 1
        return on_grid_sum(*args)

    def counted_off_grid(held_by, off_grid, *args):
        calls["redone"] += off_grid.size
        return off_grid_sum(held_by, off_grid, *args)

    # FixedPointSum calls the one-add path; that path hands elements back to quantise's own sum
    monkeypatch.setattr(fixed_point, "_on_grid_sum", counted_on_grid)
    monkeypatch.setattr(quantise, "_off_grid_sum", counted_off_grid)
    rng = np.random.default_rng(21)
    shapes = {"w": (40, 30), "b": (30,), "s": ()}
    for trial in range(4):
        count = 12
        updates = random_updates(rng, shapes, count, spread=60 if trial % 2 else 3)
        for update in updates:
            w = update.values["w"].reshape(-1)
            w[rng.integers(0, w.size, 20)] = 0
            w[rng.integers(0, w.size, 5)] = np.float32(-0.0)
            w[rng.integers(0, w.size, 5)] = np.float32(2.0 ** -140) * rng.integers(1, 100, 5)
            near = rng.integers(0, w.size, 40)
            w[near] = w[(near + 1) % w.size] * np.float32(2.0 ** -25)
        weights = [int(x) for x in rng.integers(0, 5000, count)]
        weights[0], weights[1] = 0, 2 ** 29
        summer = FixedPointSum(shapes)
        groups = [[0, 3, 4, 7], [1, 2, 5, 6], [8, 9, 10, 11]]
        own = [summer.scales([updates[k] for k in g], [weights[k] for k in g]) for g in groups]
        combined = np.maximum.reduce(own)
        for g, o in zip(groups, own):
            group, group_weights = [updates[k] for k in g], [weights[k] for k in g]
            truncating = summer.partial_sums(group, group_weights, combined)      # checked: per upload
            on_grid = summer.partial_sums(group, group_weights, combined, own_scales=o)
            assert on_grid.tobytes() == truncating.tobytes()
    assert calls["on grid"] > 0 and calls["redone"] > 0

    # packed uploads sharing one mask, and more uploads than a float64 sum holds exactly
    mask = rng.random((40, 30)) < 0.3
    for count in (9, quantise.ON_GRID_MAX_SUMMANDS + 1):
        values = rng.standard_normal((count, 40, 30)).astype(np.float32) * np.float32(4.0)
        positions = np.flatnonzero(mask)
        updates = [ModelUpdate({"w": np.where(mask, v, 0)}, {"w": mask},
                               packed={"w": (positions, v.reshape(-1)[positions])}) for v in values]
        weights = [int(x) for x in rng.integers(1, 600, count)]
        summer = FixedPointSum({"w": (40, 30)})
        scales = summer.scales(updates, weights)
        before = calls["on grid"]
        assert summer.partial_sums(updates, weights, scales, own_scales=scales).tobytes() == \
            summer.partial_sums(updates, weights, scales).tobytes()
        assert calls["on grid"] == before + (count <= quantise.ON_GRID_MAX_SUMMANDS)


def test_uploads_sharing_one_mask_are_summed_packed_with_the_same_bits():
    # a worker's clients decode values-only uploads against their own copies of one mask: the
    # positions cache finds them equal, and the fixed-point sum runs over the packed values
    from fedmpi.aggregation.common import _shared_packed_positions
    from fedmpi.comm.codec import MaskPositions, decode, encode

    rng = np.random.default_rng(12)
    shapes = {"w": (30, 20), "b": (20,)}
    mask = rng.random(shapes["w"]) < 0.3
    dense, packed, weights, cache = [], [], [], MaskPositions()
    for k in range(7):
        w = np.where(mask, rng.standard_normal(shapes["w"]) * 10.0 ** rng.integers(-8, 8, shapes["w"]), 0)
        update = ModelUpdate({"w": w.astype(np.float32), "b": rng.standard_normal(20).astype(np.float32)},
                             {"w": mask})
        own_copy = {"w": mask.copy()}
        encoded = encode(update, own_copy)
        dense.append(decode(encoded, own_copy))
        packed.append(decode(encoded, own_copy, densify=False, positions_cache=cache))
        weights.append(int(rng.integers(1, 600)))
    assert _shared_packed_positions(packed, "w") is not None
    summer = FixedPointSum(shapes)
    scales = summer.scales(dense, weights)
    assert np.array_equal(summer.scales(packed, weights), scales)
    whole = summer.partial_sums(dense, weights, scales)
    grouped = summer.partial_sums(packed[:3], weights[:3], scales) + summer.partial_sums(packed[3:], weights[3:], scales)
    assert whole.tobytes() == grouped.tobytes()


def test_non_finite_summands_are_refused_naming_the_tensor_unless_masked_out(grid_path):
    good = ModelUpdate({"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = ModelUpdate({"w": np.array([1, bad_value, 1], np.float32), "b": np.ones(2, np.float32)})
        for weights in ([1, 1], [1, 0]):    # weight 0 too: 0·inf is NaN, as the float64 definition says
            with pytest.raises(ValueError, match=r"tensor 'w'.*NaN or inf"):
                fixed_point_average([good, bad], weights, {"w": np.zeros(3, np.float32),
                                                           "b": np.zeros(2, np.float32)})
    # outside the upload's mask a value is ignored, as average_over_holders ignores it
    hidden = ModelUpdate({"w": np.array([1, np.nan, 1], np.float32)}, {"w": np.array([True, False, True])})
    averaged, _ = fixed_point_average([good, hidden], [1, 1], {"w": np.zeros(3, np.float32)}, "zero")
    assert averaged["w"].tolist() == [1.0, 1.0, 1.0]


def test_refused_inputs():
    update = ModelUpdate({"t": np.ones(2, np.float32)})
    reference = {"t": np.zeros(2, np.float32)}
    for weight in (1.5, -1, True, 2 ** 30):
        with pytest.raises(ValueError, match="integer weights"):
            fixed_point_average([update], [weight], reference)
    with pytest.raises(ValueError, match="2\\^20"):
        FixedPointSum({"t": (2,)}).partial_sums([update] * (MAX_CONTRIBUTIONS + 1), [1] * (MAX_CONTRIBUTIONS + 1),
                                                np.zeros(3, np.int16))
    with pytest.raises(ValueError, match="slice"):
        fixed_point_average([ModelUpdate({"t": np.ones(1, np.float32)}, slices={"t": ((0, 1),)})], [1], reference)
    # scales computed without an upload cannot hold it
    summer = FixedPointSum({"t": (2,)})
    small = summer.scales([ModelUpdate({"t": np.full(2, 0.5, np.float32)})], [1])
    with pytest.raises(ValueError, match="scales"):
        summer.partial_sums([ModelUpdate({"t": np.full(2, 4.0, np.float32)})], [1], small)
    # a first pass is the running sums of its own uploads and weights only
    first = summer.first_pass([update, update], [1, 2])
    for uploads, weights in (([update, update], [2, 1]), ([update], [1])):
        with pytest.raises(ValueError, match="first pass of other uploads"):
            summer.partial_sums(uploads, weights, first.scales, own=first)


# ------------------------------------------------------------------------------ algorithm hooks
def make_info(shapes, maskable=()):
    return ModelInfo(shapes=dict(shapes), maskable=list(maskable), layer_flops={})


def test_partial_sums_flag_goes_with_the_weight_hook():
    """Validation reads the class flag; the engine then calls the hook: a flagged method defines
    it. The masked-FedAvg methods merge through it too, on the server only (flag off)."""
    builtin = {n: c for n, c in ALGORITHMS.items() if ALGORITHMS.origin(n).source == "builtin"}
    overrides = {n for n, c in builtin.items() if c.partial_sum_weight is not Algorithm.partial_sum_weight}
    assert {n for n, c in builtin.items() if c.partial_sums} == {"fedavg", "fedavgm", "fedprox", "feddst",
                                                                 "randommask"}
    assert overrides == {"fedavg", "fedavgm", "fedprox", "feddst", "randommask", "prunefl", "snip", "imp"}


def test_a_non_integer_weight_is_refused_naming_the_algorithm(monkeypatch):
    cfg = load_config(None, ["model=mlp", "aggregation.sum=fixed_point"])
    algorithm = build_algorithm(cfg, make_info(SHAPES))
    monkeypatch.setattr(type(algorithm), "partial_sum_weight", lambda self, c, n: n / 2)
    with pytest.raises(ValueError, match=r"fedavg: partial_sum_weight of client 3 is 2.5"):
        algorithm.partial_sum_weights({3: 5})


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "feddst"])
def test_aggregate_from_reduced_sums_equals_aggregate_from_uploads(name):
    """The server path (decoded uploads, fixed point) and the sums the ranks reduced give the
    same global model, masks and votes-driven re-prune included."""
    from fedmpi.models import build_model, maskable_parameter_names

    model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    info = make_info(shapes, maskable_parameter_names(model))
    cfg = load_config(None, ["model=mlp", "data.name=synthetic", f"algorithm={name}", "aggregation.sum=fixed_point",
                             "sparsity=0.8" if name == "feddst" else "sparsity=0"])
    rng = np.random.default_rng(2)
    start = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    server, workers = build_algorithm(cfg, info), build_algorithm(cfg, info)
    for algorithm in (server, workers):
        algorithm.init_server({n: v.copy() for n, v in start.items()}, np.random.default_rng(0))
    for round_ in (1, 2):
        masked = tuple(server.masks)
        updates = random_updates(rng, shapes, 5, masked=masked, density=0.3)
        sizes = {c: int(rng.integers(10, 90)) for c in (1, 4, 5, 8, 9)}
        results = [ClientResult(c, sizes[c], u, 0.0, sizes[c]) for c, u in zip(sizes, updates)]
        server.aggregate(round_, results)
        weights = workers.partial_sum_weights(sizes)
        summer = FixedPointSum(shapes)
        groups = [[0, 3], [], [1, 2, 4]]
        scales = np.maximum.reduce([summer.scales([updates[k] for k in g], [weights[results[k].client_id] for k in g])
                                    for g in groups])
        sums = sum(summer.partial_sums([updates[k] for k in g], [weights[results[k].client_id] for k in g], scales)
                   for g in groups)
        bare = [ClientResult(r.client_id, r.num_samples, None, 0.0, r.num_samples) for r in results]
        workers.aggregate(round_, bare, RoundSums(summer, sums, scales))
        assert_same_tensors(server.weights, workers.weights)
        assert_same_tensors(server.masks, workers.masks)
    if name == "feddst":
        assert server.masks


# ------------------------------------------------------------------------------ over MPI ranks
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wait", ["sleep", "spin"])
def test_two_phases_over_the_ranks_equal_the_sum_all_at_once(wait):
    """Every rank draws the same uploads and sums its own share (rank 0 none, as with P > 1);
    Allreduce MAX and Reduce SUM give rank 0 the all-at-once bits. Every collective runs before
    any assertion, so a failing check cannot leave a rank waiting."""
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator

    comm = Communicator(MPI.COMM_WORLD, wait=wait)
    rng = np.random.default_rng(21)
    shapes = {"w": (50, 30), "b": (30,)}
    updates = random_updates(rng, shapes, 11, masked=("w",), spread=25)
    weights = [int(w) for w in rng.integers(1, 3000, size=11)]
    owner = rng.integers(1, comm.size, size=11)           # the ranks that "trained" each client
    mine = [k for k in range(11) if owner[k] == comm.rank]
    summer = FixedPointSum(shapes)
    local_scales = summer.scales([updates[k] for k in mine], [weights[k] for k in mine])
    scales = comm.allreduce_max_int16(local_scales)
    local_sums = summer.partial_sums([updates[k] for k in mine], [weights[k] for k in mine], scales)
    sums = comm.reduce_sum_int64(local_sums)
    reference = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    if comm.is_server:
        got = RoundSums(summer, sums, scales).average(reference, "zero")
        for a, b in zip(fixed_point_average(updates, weights, reference, "zero"), got):
            assert_same_tensors(a, b)
        expected = 2 * (comm.size - 1) * local_scales.nbytes + (comm.size - 1) * local_sums.nbytes
        assert comm.traffic.payload_bytes == expected and comm.traffic.control_bytes == 0
    else:
        assert sums is None
    assert same_bits(scales, np.maximum.reduce([summer.scales([updates[k] for k in range(11) if owner[k] == r],
                                                               [weights[k] for k in range(11) if owner[k] == r])
                                                for r in range(comm.size)]))


@pytest.mark.mpi(min_size=2)
def test_reductions_of_empty_and_extreme_arrays():
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator

    comm = Communicator(MPI.COMM_WORLD)
    empty_max = comm.allreduce_max_int16(np.zeros(0, np.int16))
    empty_sum = comm.reduce_sum_int64(np.zeros(0, np.int64))
    extremes = comm.allreduce_max_int16(np.array([NO_SUMMAND, comm.rank - 1100, 1025 - comm.rank], np.int16))
    big = comm.reduce_sum_int64(np.array([2 ** 60, -(2 ** 61), comm.rank], np.int64))
    assert empty_max.size == 0 and extremes.tolist() == [NO_SUMMAND, comm.size - 1101, 1025]
    if comm.is_server:
        assert empty_sum.size == 0
        assert big.tolist() == [comm.size * 2 ** 60, -comm.size * 2 ** 61, comm.size * (comm.size - 1) // 2]


# ------------------------------------------------------------------------------ end to end
DST = {"algorithm": "feddst", "rounds": 4, "sparsity": 0.8,
       "local": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001},
       "feddst": {"alpha": 0.3, "readjust_every": 2, "r_end": 4}}     # round 2 readjusts the masks
CONFIGS = {"fedavg": {}, "feddst": DST}
TIMINGS = {"wall_seconds", "cum_wall_seconds", "compute_seconds", "server_peak_rss_bytes"}   # machine state
TRAFFIC = {"mpi_payload_bytes", "mpi_control_bytes"}


@pytest.fixture(scope="module")
def e2e(tiny_runs):
    """Results per (algorithm, sum, where, ranks), from the session's runs of the tiny config
    (conftest.py): FedAvg with the float64 sum on the server (the defaults) is test_run's run."""
    def get(algorithm: str, sum_mode: str, where: str, ranks: int):
        _, results, _ = tiny_runs(f"aggregation.sum={sum_mode}", f"aggregation.where={where}", ranks=ranks,
                                  **CONFIGS[algorithm])
        return results

    return get


def assert_same_columns(a: dict, b: dict, what: str, skip=TIMINGS | TRAFFIC | {"rank"}):
    for table in ("rounds", "clients"):
        assert set(a[table]) == set(b[table]), what
        for name in sorted(set(a[table]) - skip):
            assert same_bits(a[table][name], b[table][name]), f"{what}: {table}/{name}"


@needs_mpiexec
@pytest.mark.parametrize("algorithm", ["fedavg", "feddst"])
@pytest.mark.slow
def test_sums_on_the_workers_equal_the_sum_on_the_server_whatever_the_rank_count(e2e, algorithm):
    reference = e2e(algorithm, "fixed_point", "server", 1)
    assert np.all(np.isfinite(reference["rounds"]["test_accuracy"]))
    if algorithm == "feddst":
        assert reference["rounds"]["mask_changed"][1] > 0        # the readjustment moved masks
    for ranks in (1, 2, 4):
        other = e2e(algorithm, "fixed_point", "workers", ranks)
        assert_same_columns(reference, other, f"{algorithm} server P=1 vs workers P={ranks}")
        assert json.loads(other["attrs"]["config"])["aggregation"] == {"sum": "fixed_point", "where": "workers"}


@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.slow
def test_workers_payload_bytes_follow_their_formula(e2e, ranks):
    """FedAvg, dense MLP, 4 clients per round: each round moves the download broadcast, the int16
    scales (n exponents + one flag per tensor; an allreduce counts twice) and each worker rank's
    int64 sums (n numerators + one vote count per unmasked tensor), instead of the 4 uploads.
    Smaller than the gather when a worker rank holds more than 3 clients (P = 2: 4), larger at 1-2
    (P = 4)."""
    res = e2e("fedavg", "fixed_point", "workers", ranks)
    n, tensors = mlp_parameter_count(), 6
    rounds, clients = res["rounds"], res["clients"]
    for r, payload in zip(rounds["round"], rounds["mpi_payload_bytes"]):
        this = clients["round"] == r
        download = int(clients["download_bytes"][this][0])
        sums = (ranks - 1) * (2 * 2 * (n + tensors) + 8 * (n + tensors))
        assert payload == download * (ranks - 1) + sums, (ranks, r)
        gathered = download * (ranks - 1) + int(clients["upload_bytes"][this].sum())
        assert (payload < gathered) == (ranks == 2), (ranks, payload, gathered)


@needs_mpiexec
@pytest.mark.parametrize("algorithm", ["fedavg", "feddst"])
@pytest.mark.slow
def test_fixed_point_and_float64_runs_agree_within_tolerance(e2e, algorithm):
    """A round's fixed-point average is within one float32 ulp of the float64 one (and nearly
    always equal: see test_fixed_point_agrees_with_float64_within_one_float32_ulp); training then
    propagates any such difference. After these few rounds the runs must agree to 1e-4 in test
    loss (relative) and 1 % in accuracies; byte columns are compared where masks cannot differ."""
    fixed = e2e(algorithm, "fixed_point", "server", 1)
    plain = e2e(algorithm, "float64", "server", 1)
    for name in ("test_loss", "test_accuracy", "client_accuracy"):
        np.testing.assert_allclose(fixed["rounds"][name], plain["rounds"][name],
                                   rtol=1e-4 if name == "test_loss" else 0, atol=0 if name == "test_loss" else 0.01)
    np.testing.assert_allclose(fixed["clients"]["train_loss"], plain["clients"]["train_loss"], rtol=1e-4)
    if algorithm == "fedavg":
        assert same_bits(fixed["clients"]["upload_bytes"], plain["clients"]["upload_bytes"])


# ------------------------------------------------------------------------------ validation
def test_config_refusals_name_what_to_set():
    with pytest.raises(ConfigError, match=r"aggregation.where.*aggregation.sum=fixed_point"):
        load_config(None, ["aggregation.where=workers"])
    with pytest.raises(ConfigError, match=r"aggregation.where.*prunefl.*aggregation.where=server"):
        load_config(None, ["algorithm=prunefl", "aggregation.sum=fixed_point", "aggregation.where=workers"])
    with pytest.raises(ConfigError, match=r"aggregation.sum.*heterofl"):
        load_config(None, ["algorithm=heterofl", "model=multiexit_vgg_small", "aggregation.sum=fixed_point"])
    with pytest.raises(ConfigError, match=r"aggregation.sum.*2\^20"):
        load_config(None, ["aggregation.sum=fixed_point", f"clients.total={MAX_CONTRIBUTIONS + 1}",
                           f"clients.per_round={MAX_CONTRIBUTIONS + 1}"])
    for bad in (["aggregation.sum=float32"], ["aggregation.where=rank0"]):
        with pytest.raises(ConfigError, match="aggregation"):
            load_config(None, bad)
    for algorithm in ("fedavg", "fedavgm", "fedprox", "feddst", "randommask"):
        cfg = load_config(None, [f"algorithm={algorithm}", "aggregation.sum=fixed_point", "aggregation.where=workers"])
        assert cfg["aggregation"] == {"sum": "fixed_point", "where": "workers"}
    assert load_config(None, [])["aggregation"] == {"sum": "float64", "where": "server"}


def test_where_is_outside_the_run_identity_and_sum_inside():
    from fedmpi.results.writer import identity_settings

    keys = identity_settings(load_config(None, []))
    assert "aggregation.sum" in keys and "aggregation.where" not in keys


@pytest.mark.slow
def test_refused_configs_exit_2_before_round_1(tmp_path):
    config = write_config(tmp_path / "tiny.yaml")
    cases = [["--set", "aggregation.where=workers"],
             ["--set", "algorithm=prunefl", "--set", "prunefl.adaptive=false", "--set", "aggregation.sum=fixed_point",
              "--set", "aggregation.where=workers"]]
    argv = [["run", str(config), "--out", str(tmp_path / f"bad{i}.h5"), "--quiet", *args] for i, args in enumerate(cases)]
    (tmp_path / "argv.json").write_text(json.dumps(argv))
    (tmp_path / "batch.py").write_text(BATCH_SCRIPT)
    proc, _ = fedmpi([str(tmp_path / "batch.py"), str(tmp_path / "argv.json")], timeout=120, module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, (res, needle) in enumerate(zip(results, ["aggregation.sum=fixed_point", "aggregation.where=server"])):
        assert res["rc"] == 2, res
        assert "aggregation.where" in res["stderr"] and needle in res["stderr"], res["stderr"]
        assert "Traceback" not in res["stderr"]
        assert not (tmp_path / f"bad{i}.h5").exists()
