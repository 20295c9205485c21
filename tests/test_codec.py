"""fedmpi.comm.codec: exact round trips, the encoding each layout picks, payload byte counts."""
import math

import numpy as np
import pytest

from fedmpi.comm.codec import (
    BITMAP,
    DENSE,
    HEADER_BYTES_PER_TENSOR,
    INDEX,
    VALUES,
    ModelUpdate,
    decode,
    encode,
    expected_payload_bytes,
)

DENSITIES = [0.0, 0.001, 0.05, 0.5, 0.99, 1.0]
SHAPES = [(1,), (7,), (255,), (256,), (257,), (65536,), (65537,), (16, 17), (4, 3, 5, 5), (2, 3, 33, 35)]


def index_width(n: int) -> int:
    """Bytes of one flat position of an n-element tensor, written out independently of the codec."""
    largest = n - 1
    if largest < 2**8:
        return 1
    if largest < 2**16:
        return 2
    if largest < 2**32:
        return 4
    return 8


def random_mask(rng, shape, density):
    if density == 0.0:
        return np.zeros(shape, dtype=bool)
    if density == 1.0:
        return np.ones(shape, dtype=bool)
    return rng.random(shape) < density


def random_values(rng, shape, mask=None):
    values = rng.standard_normal(shape).astype(np.float32)
    return values if mask is None else np.where(mask, values, np.float32(0))


def bits(a):
    """Bit pattern of a float32 array, so -0.0 / NaN compare exactly."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_update(got: ModelUpdate, want: ModelUpdate):
    assert list(got.values) == list(want.values)
    for name, value in want.values.items():
        assert got.values[name].shape == value.shape, name
        assert got.values[name].dtype == np.float32, name
        np.testing.assert_array_equal(bits(got.values[name]), bits(value), err_msg=name)
    assert set(got.masks) == set(want.masks)
    for name, mask in want.masks.items():
        assert got.masks[name].dtype == bool
        assert got.masks[name].shape == mask.shape
        np.testing.assert_array_equal(got.masks[name], mask, err_msg=name)


def expected_changed_mask_encoding(n: int, nnz: int) -> int:
    return INDEX if index_width(n) * nnz < math.ceil(n / 8) else BITMAP


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_round_trip_without_reference(shape, density):
    rng = np.random.default_rng([len(shape), int(np.prod(shape)), int(density * 1000)])
    mask = random_mask(rng, shape, density)
    update = ModelUpdate({"w": random_values(rng, shape, mask)}, {"w": mask})
    enc = encode(update)
    n, nnz = mask.size, int(mask.sum())
    assert enc.layout == [("w", expected_changed_mask_encoding(n, nnz), nnz)]
    assert_same_update(decode(enc, {"w": shape}), update)
    by_hand = 4 * nnz + min(math.ceil(n / 8), index_width(n) * nnz)
    assert enc.nbytes == by_hand == expected_payload_bytes(update)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_round_trip_with_unchanged_reference_sends_values_only(shape, density):
    rng = np.random.default_rng([7, int(np.prod(shape)), int(density * 1000)])
    mask = random_mask(rng, shape, density)
    update = ModelUpdate({"w": random_values(rng, shape, mask)}, {"w": mask})
    reference = {"w": mask.copy()}
    enc = encode(update, reference)
    nnz = int(mask.sum())
    assert enc.layout == [("w", VALUES, nnz)]
    assert enc.nbytes == 4 * nnz == expected_payload_bytes(update, reference)
    assert_same_update(decode(enc, {"w": shape}, reference), update)


@pytest.mark.parametrize("shape", [(257,), (65537,), (4, 3, 5, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.001, 0.5])
def test_changed_reference_sends_the_mask(shape, density):
    rng = np.random.default_rng(11)
    mask = random_mask(rng, shape, density)
    old = mask.copy()
    old.reshape(-1)[0] = not old.reshape(-1)[0]   # the receiver holds a mask differing in one entry
    update = ModelUpdate({"w": random_values(rng, shape, mask)}, {"w": mask})
    enc = encode(update, {"w": old})
    n, nnz = mask.size, int(mask.sum())
    assert enc.layout == [("w", expected_changed_mask_encoding(n, nnz), nnz)]
    assert enc.nbytes == 4 * nnz + min(math.ceil(n / 8), index_width(n) * nnz)
    assert enc.nbytes == expected_payload_bytes(update, {"w": old})
    assert_same_update(decode(enc, {"w": shape}, {"w": old}), update)


def test_both_mask_encodings_are_exercised_at_every_index_width():
    """Sizes straddling the uint8/uint16/uint32 boundaries, sparse enough for INDEX, dense for BITMAP."""
    seen = set()
    for n in (255, 256, 257, 65536, 65537):
        for nnz in (1, n // 2):
            mask = np.zeros(n, dtype=bool)
            mask[np.linspace(0, n - 1, nnz).astype(int)] = True
            nnz = int(mask.sum())
            enc = encode(ModelUpdate({"w": np.where(mask, 1.5, 0).astype(np.float32)}, {"w": mask}))
            encoding = enc.layout[0][1]
            assert encoding == expected_changed_mask_encoding(n, nnz)
            seen.add((index_width(n), encoding))
            if encoding == INDEX:
                # positions are stored in the narrowest type: 4 value bytes + width per kept weight
                assert enc.nbytes == nnz * (4 + index_width(n))
    assert {(1, INDEX), (1, BITMAP), (2, INDEX), (2, BITMAP), (4, INDEX), (4, BITMAP)} <= seen


def test_index_encoding_is_chosen_only_when_strictly_smaller():
    # n = 64: bitmap 8 bytes; uint8 positions: 8 kept -> 8 bytes (tie -> bitmap), 7 kept -> index
    for nnz, want in ((8, BITMAP), (7, INDEX)):
        mask = np.zeros(64, dtype=bool)
        mask[:nnz] = True
        enc = encode(ModelUpdate({"w": mask.astype(np.float32)}, {"w": mask}))
        assert enc.layout[0][1] == want
        assert enc.nbytes == (4 * nnz + 8 if want == BITMAP else 4 * nnz + nnz)


def test_dense_tensors_round_trip_bit_exactly_including_special_values():
    rng = np.random.default_rng(3)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).tiny,
                        np.finfo(np.float32).max, 1e-45], dtype=np.float32)
    update = ModelUpdate({
        "special": special,
        "a": random_values(rng, (7,)),
        "b": random_values(rng, (4, 3, 5, 5)),
        "c": np.asfortranarray(random_values(rng, (16, 17))),   # non-contiguous input
    })
    enc = encode(update)
    assert [e for _, e, _ in enc.layout] == [DENSE] * 4
    assert [c for _, _, c in enc.layout] == [v.size for v in update.values.values()]
    assert enc.nbytes == 4 * sum(v.size for v in update.values.values()) == expected_payload_bytes(update)
    shapes = {n: v.shape for n, v in update.values.items()}
    assert_same_update(decode(enc, shapes), update)


def test_mixed_update_bytes_by_hand():
    """Several tensors: dense biases, one unchanged mask, two changed masks (one INDEX, one BITMAP)."""
    rng = np.random.default_rng(5)
    shapes = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "fc.weight": (300, 257), "fc.bias": (257,),
              "out.weight": (10, 30)}
    masks = {"conv.weight": random_mask(rng, shapes["conv.weight"], 0.5),
             "fc.weight": random_mask(rng, shapes["fc.weight"], 0.01),
             "out.weight": random_mask(rng, shapes["out.weight"], 0.3)}
    values = {n: random_values(rng, s, masks.get(n)) for n, s in shapes.items()}
    reference = {"out.weight": masks["out.weight"].copy(),               # unchanged: values only
                 "fc.weight": ~masks["fc.weight"]}                       # changed
    update = ModelUpdate(values, masks)
    enc = encode(update, reference)

    by_hand = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if name not in masks:
            by_hand += 4 * n
            continue
        nnz = int(masks[name].sum())
        by_hand += 4 * nnz
        if not (name in reference and np.array_equal(reference[name], masks[name])):
            by_hand += min(math.ceil(n / 8), index_width(n) * nnz)
    assert enc.nbytes == by_hand == expected_payload_bytes(update, reference)
    assert enc.header_bytes == HEADER_BYTES_PER_TENSOR * len(shapes)
    encodings = {name: e for name, e, _ in enc.layout}
    assert encodings == {"conv.weight": BITMAP, "conv.bias": DENSE, "fc.weight": INDEX, "fc.bias": DENSE,
                         "out.weight": VALUES}
    assert_same_update(decode(enc, shapes, reference), update)


def test_dense_update_of_mnistnet_is_four_bytes_per_parameter():
    from fedmpi.models import build_model

    model = build_model("mnistnet", (1, 28, 28), 10)
    params = sum(p.numel() for p in model.parameters())
    state = {n: t.detach().numpy() for n, t in model.state_dict().items() if t.is_floating_point()}
    assert sum(v.size for v in state.values()) == params        # no float buffers besides parameters
    enc = encode(ModelUpdate(state))
    assert enc.nbytes == 4 * params == expected_payload_bytes(ModelUpdate(state))
    assert params == 261_840 and enc.nbytes == 1_047_360           # FedDST paper's MNIST CNN
    decoded = decode(enc, {n: v.shape for n, v in state.items()})
    for n, v in state.items():
        np.testing.assert_array_equal(decoded.values[n], v)


def test_empty_update_is_an_empty_payload():
    enc = encode(ModelUpdate({}))
    assert enc.nbytes == 0 and enc.layout == []
    assert decode(enc, {}).values == {}


# ------------------------------------------------------------------------------ malformed payloads
def _updates_of_every_encoding():
    rng = np.random.default_rng(9)
    sparse = random_mask(rng, (257,), 0.01)
    half = random_mask(rng, (255,), 0.5)
    same = random_mask(rng, (40,), 0.5)
    update = ModelUpdate(
        {"d": random_values(rng, (5,)), "i": random_values(rng, (257,), sparse),
         "b": random_values(rng, (255,), half), "v": random_values(rng, (40,), same)},
        {"i": sparse, "b": half, "v": same})
    reference = {"v": same.copy()}
    shapes = {n: v.shape for n, v in update.values.items()}
    return update, reference, shapes


def test_fixture_covers_every_encoding():
    update, reference, _ = _updates_of_every_encoding()
    assert sorted(e for _, e, _ in encode(update, reference).layout) == [DENSE, VALUES, BITMAP, INDEX]


def test_every_truncation_raises_value_error():
    update, reference, shapes = _updates_of_every_encoding()
    enc = encode(update, reference)
    assert enc.nbytes > 0
    for cut in range(enc.nbytes):
        truncated = type(enc)(enc.layout, enc.data[:cut].copy())
        with pytest.raises(ValueError):
            decode(truncated, shapes, reference)


@pytest.mark.parametrize("extra", [1, 3, 64])
def test_trailing_bytes_raise_value_error(extra):
    update, reference, shapes = _updates_of_every_encoding()
    enc = encode(update, reference)
    padded = type(enc)(enc.layout, np.concatenate([enc.data, np.zeros(extra, np.uint8)]))
    with pytest.raises(ValueError, match="trailing"):
        decode(padded, shapes, reference)


def test_values_only_payload_without_receiver_mask_raises():
    update, reference, shapes = _updates_of_every_encoding()
    enc = encode(update, reference)
    with pytest.raises(ValueError):
        decode(enc, shapes, {})


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError):
        encode(ModelUpdate({"w": np.zeros(10, np.float32)}, {"w": np.ones(9, bool)}))


def test_decoded_arrays_do_not_alias_the_receive_buffer():
    update, reference, shapes = _updates_of_every_encoding()
    enc = encode(update, reference)
    decoded = decode(enc, shapes, reference)
    enc.data[:] = 0xFF
    assert_same_update(decoded, update)


def test_expected_bytes_agree_with_encoder_for_a_flat_reference_mask():
    rng = np.random.default_rng(2)
    mask = random_mask(rng, (16, 17), 0.5)
    update = ModelUpdate({"w": random_values(rng, (16, 17), mask)}, {"w": mask})
    reference = {"w": mask.reshape(-1).copy()}
    enc = encode(update, reference)
    assert enc.layout[0][1] == VALUES
    assert enc.nbytes == expected_payload_bytes(update, reference)
