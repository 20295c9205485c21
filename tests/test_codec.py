"""fedmpi.comm.codec: exact round trips, the encoding each layout picks, payload and header byte counts."""
import math

import numpy as np
import pytest

from fedmpi.comm.codec import (
    BITMAP,
    DENSE,
    HEADER_BYTES_PER_TENSOR,
    INDEX,
    VALUES,
    WIRE_DTYPES,
    Encoded,
    MaskPositions,
    decode,
    encode,
)
from fedmpi.update import ModelUpdate, tensor_view

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


def changed_mask_bytes(n: int, nnz: int) -> int:
    return min(math.ceil(n / 8), index_width(n) * nnz)


def expected_changed_mask_encoding(n: int, nnz: int) -> int:
    return INDEX if index_width(n) * nnz < math.ceil(n / 8) else BITMAP


def random_mask(rng, shape, density):
    if density == 0.0:
        return np.zeros(shape, dtype=bool)
    if density == 1.0:
        return np.ones(shape, dtype=bool)
    return np.asarray(rng.random(shape) < density)


def random_values(rng, shape, mask=None, dtype="float32"):
    dtype = np.dtype(dtype)
    if dtype == bool:
        values = rng.random(shape) < 0.5
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    else:
        values = np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4), dtype=dtype)
        specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype)
        flat = values.reshape(-1)
        hit = rng.random(flat.size) < 0.05
        flat[hit] = rng.choice(specials, int(hit.sum()))
    values = np.asarray(values, dtype=dtype)
    return values if mask is None else np.where(mask, values, np.zeros((), dtype))


def same_array(got, want) -> bool:
    """Same dtype, shape and bytes, so -0.0 and NaN payloads compare exactly."""
    got, want = np.asarray(got), np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def assert_same_update(got: ModelUpdate, want: ModelUpdate):
    assert list(got.values) == list(want.values)
    for name, value in want.values.items():
        assert same_array(got.values[name], value), name
    assert set(got.masks) == set(want.masks)
    for name, mask in want.masks.items():
        assert same_array(got.masks[name], np.asarray(mask, dtype=bool)), name
    assert got.slices == want.slices


def rows(enc: Encoded) -> list[tuple]:
    return [(row.name, row.encoding, row.count) for row in enc.layout]


def encoding_of(enc: Encoded) -> dict[str, int]:
    return {row.name: row.encoding for row in enc.layout}


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_round_trip_without_reference(shape, density):
    rng = np.random.default_rng([len(shape), int(np.prod(shape)), int(density * 1000)])
    mask = random_mask(rng, shape, density)
    update = ModelUpdate({"w": random_values(rng, shape, mask)}, {"w": mask})
    enc = encode(update)
    n, nnz = mask.size, int(mask.sum())
    assert rows(enc) == [("w", expected_changed_mask_encoding(n, nnz), nnz)]
    assert_same_update(decode(enc), update)
    assert enc.nbytes == 4 * nnz + changed_mask_bytes(n, nnz)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_round_trip_with_unchanged_reference_sends_values_only(shape, density):
    rng = np.random.default_rng([7, int(np.prod(shape)), int(density * 1000)])
    mask = random_mask(rng, shape, density)
    update = ModelUpdate({"w": random_values(rng, shape, mask)}, {"w": mask})
    reference = {"w": mask.copy()}
    enc = encode(update, reference)
    nnz = int(mask.sum())
    assert rows(enc) == [("w", VALUES, nnz)]
    assert enc.nbytes == 4 * nnz
    assert_same_update(decode(enc, reference), update)


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
    assert rows(enc) == [("w", expected_changed_mask_encoding(n, nnz), nnz)]
    assert enc.nbytes == 4 * nnz + changed_mask_bytes(n, nnz)
    assert_same_update(decode(enc, {"w": old}), update)


def test_both_mask_encodings_are_exercised_at_every_index_width():
    """Sizes straddling the uint8/uint16/uint32 boundaries, sparse enough for INDEX, dense for BITMAP."""
    seen = set()
    for n in (255, 256, 257, 65536, 65537):
        for nnz in (1, n // 2):
            mask = np.zeros(n, dtype=bool)
            mask[np.linspace(0, n - 1, nnz).astype(int)] = True
            nnz = int(mask.sum())
            enc = encode(ModelUpdate({"w": np.where(mask, 1.5, 0).astype(np.float32)}, {"w": mask}))
            encoding = enc.layout[0].encoding
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
        assert enc.layout[0].encoding == want
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
    assert [row.encoding for row in enc.layout] == [DENSE] * 4
    assert [row.count for row in enc.layout] == [v.size for v in update.values.values()]
    assert enc.nbytes == 4 * sum(v.size for v in update.values.values())
    assert_same_update(decode(enc), update)


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
            by_hand += changed_mask_bytes(n, nnz)
    assert enc.nbytes == by_hand
    assert enc.header_bytes == HEADER_BYTES_PER_TENSOR * len(shapes)
    assert encode(update, reference, schema=shapes).header_bytes == HEADER_BYTES_PER_TENSOR * len(shapes)
    assert encoding_of(enc) == {"conv.weight": BITMAP, "conv.bias": DENSE, "fc.weight": INDEX, "fc.bias": DENSE,
                                "out.weight": VALUES}
    assert_same_update(decode(enc, reference), update)


def hand_written_float32_payload(update: ModelUpdate, reference: dict) -> bytes:
    """The wire format of float32 tensors, spelled out: per tensor in order, [mask part] + values."""
    out = b""
    for name, value in update.values.items():
        flat = value.astype("<f4").reshape(-1)
        if name not in update.masks:
            out += flat.tobytes()
            continue
        mask = update.masks[name].reshape(-1)
        n, nnz = mask.size, int(mask.sum())
        if not (name in reference and np.array_equal(reference[name].reshape(-1), mask)):
            if expected_changed_mask_encoding(n, nnz) == BITMAP:
                out += np.packbits(mask).tobytes()          # bit i of the tensor, most significant first
            else:
                out += np.flatnonzero(mask).astype(f"<u{index_width(n)}").tobytes()
        out += flat[mask].tobytes()
    return out


def test_float32_payload_bytes_are_the_established_wire_format():
    """Results already recorded depend on these exact bytes."""
    rng = np.random.default_rng(21)
    for case in range(40):
        values, masks, reference = {}, {}, {}
        for i in range(int(rng.integers(1, 5))):
            shape = tuple(int(d) for d in rng.integers(1, 40, int(rng.integers(1, 4))))
            name = f"layer{i}.weight"
            if rng.random() < 0.6:
                masks[name] = random_mask(rng, shape, float(rng.choice(DENSITIES)))
                if rng.random() < 0.4:
                    reference[name] = masks[name].copy() if rng.random() < 0.5 else ~masks[name]
            values[name] = random_values(rng, shape, masks.get(name))
        update = ModelUpdate(values, masks)
        enc = encode(update, reference)
        assert enc.data.dtype == np.uint8
        assert enc.data.tobytes() == hand_written_float32_payload(update, reference), case


def test_dense_update_of_mnistnet_is_four_bytes_per_parameter():
    from fedmpi.models import build_model

    model = build_model("mnistnet", (1, 28, 28), 10)
    params = sum(p.numel() for p in model.parameters())
    state = {n: t.detach().numpy() for n, t in model.state_dict().items() if t.is_floating_point()}
    assert sum(v.size for v in state.values()) == params        # no float buffers besides parameters
    enc = encode(ModelUpdate(state))
    assert enc.nbytes == 4 * params
    assert params == 261_840 and enc.nbytes == 1_047_360           # FedDST paper's MNIST CNN
    decoded = decode(enc)
    for n, v in state.items():
        np.testing.assert_array_equal(decoded.values[n], v)


def test_empty_update_is_an_empty_payload():
    enc = encode(ModelUpdate({}))
    assert enc.nbytes == 0 and enc.layout == [] and enc.header_bytes == 0
    assert decode(enc).values == {}


# ------------------------------------------------------------------------------ dtypes and slices
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_every_wire_dtype_keeps_its_dtype_and_item_size(dtype):
    rng = np.random.default_rng(WIRE_DTYPES.index(dtype))
    mask = random_mask(rng, (6, 50), 0.3)
    nnz = int(mask.sum())
    update = ModelUpdate({"dense": random_values(rng, (3, 4), dtype=dtype),
                          "masked": random_values(rng, (6, 50), mask, dtype=dtype)}, {"masked": mask})
    enc = encode(update)
    assert [row.dtype for row in enc.layout] == [dtype, dtype]
    itemsize = np.dtype(dtype).itemsize
    assert enc.nbytes == itemsize * 12 + itemsize * nnz + changed_mask_bytes(300, nnz)
    assert_same_update(decode(enc), update)


def test_values_travel_little_endian():
    update = ModelUpdate({"a": np.array([1, 258], dtype=">i2"), "b": np.array([1.0], dtype=">f8")})
    enc = encode(update)
    assert enc.data.tobytes() == b"\x01\x00\x02\x01" + np.array([1.0], "<f8").tobytes()
    decoded = decode(enc)
    np.testing.assert_array_equal(decoded.values["a"], [1, 258])
    assert decoded.values["a"].dtype == np.int16 and decoded.values["b"].dtype == np.float64


@pytest.mark.parametrize("dtype", [np.complex64, np.uint16, object])
def test_dtypes_outside_the_wire_set_are_refused(dtype):
    with pytest.raises(ValueError, match="cannot be sent"):
        encode(ModelUpdate({"x": np.zeros(3, dtype=dtype)}))


def test_slices_round_trip_and_cost_nothing_in_the_payload():
    rng = np.random.default_rng(4)
    block = ((0, 3), (2, 7))
    mask = random_mask(rng, (3, 5), 0.5)
    update = ModelUpdate({"w": random_values(rng, (3, 5), mask), "b": random_values(rng, (3,))},
                         {"w": mask}, {"w": block, "b": ((1, 4),)})
    enc = encode(update)
    assert [row.slice for row in enc.layout] == [block, ((1, 4),)]
    assert enc.nbytes == 4 * int(mask.sum()) + changed_mask_bytes(15, int(mask.sum())) + 4 * 3
    assert_same_update(decode(enc), update)


@pytest.mark.parametrize("block", [((0, 3), (0, 4)), ((0, 3),), ((2, 5), (-1, 4)), ((0, 3), (1, 5), (0, 1))])
def test_slice_that_does_not_match_the_tensor_shape_raises(block):
    with pytest.raises(ValueError, match="slice"):
        encode(ModelUpdate({"w": np.zeros((3, 5), np.float32)}, slices={"w": block}))


# ------------------------------------------------------------------------------ header bytes
def test_header_bytes_by_hand():
    schema = {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 20), "fc.bias": (10,), "poids.é": (2,)}
    update = ModelUpdate(
        {"conv.weight": np.zeros((8, 4, 3, 3), np.float32),                   # registered, full shape
         "fc.bias": np.zeros(5, np.float32),                                  # registered, sliced
         "fc.weight": np.zeros((5, 20), np.float32),                          # registered, other shape
         "extra": np.zeros((2, 3), np.int64),                                 # not registered
         "poids.é": np.zeros(3, np.float16),                                  # non-ASCII name, other shape
         "step": np.zeros((), np.int64)},                                     # not registered, 0-d
        slices={"fc.bias": ((0, 5),)})
    enc = encode(update, schema=schema)
    assert enc.header_bytes == (9                                  # conv.weight
                                + 9 + 7 + 3 + 4 * 1 + 8 * 1        # fc.bias: name, len/dtype/ndim, shape, slice
                                + 9 + 9 + 3 + 4 * 2                # fc.weight
                                + 9 + 5 + 3 + 4 * 2                # extra
                                + 9 + 8 + 3 + 4 * 1                # poids.é: 'é' is two utf-8 bytes
                                + 9 + 4 + 3)                       # step
    # without a schema every row costs the fixed part only, as before
    assert encode(update).header_bytes == 9 * 6


def test_full_block_slice_still_pays_its_description():
    update = ModelUpdate({"fc.bias": np.zeros(10, np.float32)}, slices={"fc.bias": ((0, 10),)})
    assert encode(update, schema={"fc.bias": (10,)}).header_bytes == 9 + 7 + 3 + 4 + 8


# ------------------------------------------------------------------------------ random round trips
def random_case(rng):
    """A random update: 1-5 tensors of random dtype and 0-4 dims (some empty), some masked, some
    sliced, receiver masks equal or not; plus a random schema. Returns the expected byte counts."""
    values, masks, slices, reference, schema = {}, {}, {}, {}, {}
    payload = header = 0
    for i in range(int(rng.integers(1, 6))):
        name = f"t{i}" if rng.random() < 0.8 else f"layer.{i}.weight"
        dtype = str(rng.choice(WIRE_DTYPES))
        ndim = int(rng.integers(0, 5))
        low = 0 if rng.random() < 0.05 else 1
        shape = tuple(int(d) for d in rng.integers(low, 7, ndim))
        n = int(np.prod(shape, dtype=np.int64))
        itemsize = np.dtype(dtype).itemsize
        mask = None
        if rng.random() < 0.5:
            mask = masks[name] = random_mask(rng, shape, float(rng.choice(DENSITIES)))
            nnz = int(mask.sum())
            payload += itemsize * nnz
            kind = rng.integers(0, 3)
            if kind == 0:
                reference[name] = mask.copy()
            elif kind == 1 and n > 0:
                reference[name] = mask.copy()
                reference[name].reshape(-1)[rng.integers(0, n)] ^= True
            if kind != 0:
                payload += changed_mask_bytes(n, nnz)
        else:
            payload += itemsize * n
        values[name] = random_values(rng, shape, mask, dtype)
        full_shape = shape
        if ndim > 0 and rng.random() < 0.3:
            extra = rng.integers(0, 4, ndim)
            starts = [int(rng.integers(0, e + 1)) for e in extra]
            slices[name] = tuple((s, s + d) for s, d in zip(starts, shape))
            full_shape = tuple(int(d + e) for d, e in zip(shape, extra))
        registered = rng.random()
        if registered < 0.5:
            schema[name] = full_shape
        elif registered < 0.7:
            schema[name] = shape + (2,)
        described = not (name in schema and name not in slices and schema[name] == shape)
        header += 9 + (len(name) + 3 + 4 * ndim + (8 * ndim if name in slices else 0) if described else 0)
    return ModelUpdate(values, masks, slices), reference, schema, payload, header


def test_random_updates_round_trip_with_exact_byte_counts():
    rng = np.random.default_rng(2024)
    seen_dtypes, seen_encodings, seen_sliced, seen_ndims = set(), set(), 0, set()
    for case in range(400):
        update, reference, schema, payload, header = random_case(rng)
        enc = encode(update, reference, schema)
        assert enc.nbytes == payload, case
        assert enc.header_bytes == header, case
        assert encode(update, reference).header_bytes == 9 * len(update.values), case
        assert_same_update(decode(enc, reference), update)
        seen_dtypes |= {row.dtype for row in enc.layout}
        seen_encodings |= {row.encoding for row in enc.layout}
        seen_ndims |= {len(row.shape) for row in enc.layout}
        seen_sliced += sum(row.slice is not None for row in enc.layout)
    # the generator really exercised every dtype, encoding and rank, and slices
    assert seen_dtypes == set(WIRE_DTYPES)
    assert seen_encodings == {DENSE, VALUES, BITMAP, INDEX}
    assert seen_ndims == {0, 1, 2, 3, 4}
    assert seen_sliced > 50


def test_decoding_without_densifying_reads_back_the_same_update_and_packs_the_masked_tensors():
    rng = np.random.default_rng(77)
    for case in range(200):
        update, reference, _, _, _ = random_case(rng)
        enc = encode(update, reference)
        dense = decode(enc, reference)
        cache = MaskPositions()
        lazy = decode(enc, reference, densify=False, positions_cache=cache)
        # nothing densified yet: the masked tensors wait, as (positions, values)
        assert set(lazy.packed) == set(update.masks) == set(dense.packed), case
        for name, (positions, kept) in lazy.packed.items():
            flat_mask = np.asarray(update.masks[name], dtype=bool).reshape(-1)
            assert same_array(positions, np.flatnonzero(flat_mask)), (case, name)
            assert same_array(kept, np.asarray(update.values[name]).reshape(-1)[flat_mask]), (case, name)
        assert_same_update(lazy, update)          # reading densifies, to the same arrays
        # a second upload against the same receiver masks reuses their positions and shares them
        again = decode(enc, reference, densify=False, positions_cache=cache)
        for row in enc.layout:
            if row.encoding == VALUES:
                assert again.packed[row.name][0] is lazy.packed[row.name][0], (case, row.name)
                assert not again.masks[row.name].flags.writeable, (case, row.name)
                # the receiver's mask itself, or an equal one met before: read-only, never copied
                assert np.array_equal(again.masks[row.name], np.asarray(reference[row.name], dtype=bool)), (case, row.name)


def test_lazily_decoded_values_behave_as_a_mapping():
    mask = np.array([True, False, True, False])
    update = ModelUpdate({"w": np.array([1.0, 0.0, 3.0, 0.0], np.float32), "b": np.ones(2, np.float32)}, {"w": mask})
    lazy = decode(encode(update), densify=False)
    assert list(lazy.values) == ["w", "b"] and len(lazy.values) == 2 and "w" in lazy.values
    assert {**lazy.values}.keys() == {"w", "b"}
    assert same_array(lazy.values["w"], update.values["w"])
    lazy.values["w"] = np.zeros(4, np.float32)
    assert same_array(lazy.values["w"], np.zeros(4, np.float32))
    del lazy.values["b"]
    assert list(lazy.values) == ["w"]
    with pytest.raises(KeyError):
        lazy.values["b"]


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
    return update, reference


def test_fixture_covers_every_encoding():
    update, reference = _updates_of_every_encoding()
    assert sorted(encoding_of(encode(update, reference)).values()) == [DENSE, VALUES, BITMAP, INDEX]


def test_every_truncation_raises_value_error():
    update, reference = _updates_of_every_encoding()
    enc = encode(update, reference)
    assert enc.nbytes > 0
    for cut in range(enc.nbytes):
        truncated = Encoded(enc.layout, enc.data[:cut].copy())
        with pytest.raises(ValueError):
            decode(truncated, reference)


@pytest.mark.parametrize("extra", [1, 3, 64])
def test_trailing_bytes_raise_value_error(extra):
    update, reference = _updates_of_every_encoding()
    enc = encode(update, reference)
    padded = Encoded(enc.layout, np.concatenate([enc.data, np.zeros(extra, np.uint8)]))
    with pytest.raises(ValueError, match="trailing"):
        decode(padded, reference)


def test_values_only_payload_without_receiver_mask_raises():
    update, reference = _updates_of_every_encoding()
    enc = encode(update, reference)
    with pytest.raises(ValueError):
        decode(enc, {})


def test_receiver_mask_of_the_wrong_size_raises():
    update, reference = _updates_of_every_encoding()
    enc = encode(update, reference)
    with pytest.raises(ValueError, match="receiver's mask"):
        decode(enc, {"v": np.ones(41, bool)})


def test_index_position_outside_the_tensor_raises():
    mask = np.zeros(200, bool)
    mask[3] = True
    enc = encode(ModelUpdate({"w": mask.astype(np.float32)}, {"w": mask}))
    assert enc.layout[0].encoding == INDEX
    enc.data[0] = 250                                   # uint8 position past the 200 entries
    with pytest.raises(ValueError, match="outside"):
        decode(enc)


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError):
        encode(ModelUpdate({"w": np.zeros(10, np.float32)}, {"w": np.ones(9, bool)}))
    with pytest.raises(ValueError):
        encode(ModelUpdate({"w": np.zeros((2, 5), np.float32)}, {"w": np.ones(10, bool)}))


def test_decoded_arrays_do_not_alias_the_receive_buffer():
    update, reference = _updates_of_every_encoding()
    enc = encode(update, reference)
    decoded = decode(enc, reference)
    enc.data[:] = 0xFF
    assert_same_update(decoded, update)


def test_flat_reference_mask_counts_as_unchanged():
    rng = np.random.default_rng(2)
    mask = random_mask(rng, (16, 17), 0.5)
    update = ModelUpdate({"w": random_values(rng, (16, 17), mask)}, {"w": mask})
    reference = {"w": mask.reshape(-1).copy()}
    enc = encode(update, reference)
    assert enc.layout[0].encoding == VALUES
    assert enc.nbytes == 4 * int(mask.sum())
    assert_same_update(decode(enc, reference), update)


def test_tensor_view_shares_a_read_only_decoded_array_without_a_warning():
    import warnings

    buffer = encode(ModelUpdate({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})).data.copy()
    buffer.flags.writeable = False         # as train_clients holds a received download
    update = decode(Encoded(encode(ModelUpdate({"w": np.zeros((2, 3), np.float32)})).layout, buffer), densify=False)
    values = update.values["w"]
    assert not values.flags.writeable and np.shares_memory(values, buffer)
    with pytest.raises(ValueError, match="read-only"):
        values[0, 0] = 1                   # no client can change what the next one is sent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = tensor_view(values)
    assert tensor.data_ptr() == values.ctypes.data
    assert tensor.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_encode_into_given_memory_gives_the_same_bytes():
    rng = np.random.default_rng(3)
    mask = rng.random((6, 5)) < 0.4
    update = ModelUpdate({"w": rng.standard_normal((6, 5)).astype(np.float32),
                          "b": rng.standard_normal(5).astype(np.float32)}, {"w": mask})
    given = []

    def allocate(nbytes):
        given.append(np.full(nbytes, 0xAB, dtype=np.uint8))
        return given[-1]

    plain, into = encode(update), encode(update, allocate=allocate)
    assert into.data is given[0] and into.data.tobytes() == plain.data.tobytes()
    assert into.layout == plain.layout


def test_upload_arena_reuses_one_block_from_the_second_round():
    from fedmpi.comm.arena import ALIGN, UploadArena

    arena = UploadArena()
    sizes = [1000, 37, 4096, 5]
    for round_ in range(3):
        arena.reset()
        buffers = [arena.take(n) for n in sizes]
        assert [b.size for b in buffers] == sizes
        for i, b in enumerate(buffers):      # writable and disjoint: each keeps what was written
            b[:] = i
        assert all(np.all(b == i) for i, b in enumerate(buffers))
        in_block = [np.shares_memory(b, arena._block) for b in buffers]
        # round 1 has no block yet; from round 2 on every buffer comes from it, cache-line aligned
        assert in_block == [round_ > 0] * len(sizes)
        if round_:
            assert all(b.ctypes.data % ALIGN == 0 for b in buffers)
    arena.reset()
    bigger = [arena.take(n) for n in sizes + [10_000]]     # more than the block: the excess is fresh
    assert not np.shares_memory(bigger[-1], arena._block)
    arena.reset()
    assert all(np.shares_memory(arena.take(n), arena._block) for n in sizes + [10_000])
