"""Compressed pseudo-gradients (paramserver_client.compression): wire layouts, error bounds,
validation of corrupted data, top-k selection and the error-feedback identities."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from paramserver_client import compression as C
from paramserver_client.codec import CHUNK_BYTES, MAX_CHUNK_BYTES

# Hypothesis writes nothing into the repository (its caches go to a temp dir), as in tests/fuzz.
set_hypothesis_home_dir(Path(tempfile.mkdtemp(prefix="ps-hypothesis-")))

QMAX = {"int8": C.INT8_MAX, "int4": C.INT4_MAX}
ENCODE = {"int8": C.encode_int8, "int4": C.encode_int4}
DECODE = {"int8": C.decode_int8, "int4": C.decode_int4}
MAX_SCALE = {"int8": C.MAX_SCALE_INT8, "int4": C.MAX_SCALE_INT4}
QUANT = pytest.mark.parametrize("method", ["int8", "int4"])
F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)  # 2**-149


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def scales_of(data: bytes, count: int) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4", count=C.num_blocks(count)).astype(np.float32)


def check_bound(x: np.ndarray, method: str) -> np.ndarray:
    """Encode, decode, and check |x - x_hat| <= scale * (0.5 + 2 * qmax * 2**-24) per element
    (scale / 2 plus the float32 rounding of the division and of the decoding product); also
    that the scale is absmax / qmax rounded up to float32. Returns the decoded values."""
    qmax = QMAX[method]
    data = ENCODE[method](x)
    assert len(data) == C.compressed_size(x.size, method)
    xh = DECODE[method](data, x.size)
    assert xh.dtype == np.float32 and xh.shape == (x.size,)
    assert np.isfinite(xh).all()
    scales = scales_of(data, x.size)
    s = np.repeat(scales.astype(np.float64), C.BLOCK)[: x.size]
    err = np.abs(x.astype(np.float64) - xh.astype(np.float64))
    bad = err > s * (0.5 + 2 * qmax * 2.0**-24)
    assert not bad.any(), (x[bad][:5], xh[bad][:5], s[bad][:5])
    # the scale is ceil32(absmax / qmax), clamped to the largest valid scale
    padded = np.zeros(C.num_blocks(x.size) * C.BLOCK, np.float32)
    padded[: x.size] = np.abs(x)
    absmax = padded.reshape(-1, C.BLOCK).max(axis=1).astype(np.float64) if x.size else np.zeros(0)
    s64 = scales.astype(np.float64)
    clamped = scales == MAX_SCALE[method]
    assert ((s64 * qmax >= absmax) | clamped).all()
    below = np.nextafter(scales, np.float32(0)).astype(np.float64)
    assert ((below * qmax < absmax) | (scales == 0)).all()
    assert ((scales == 0) == (absmax == 0)).all()
    return xh


# ---- layouts ----------------------------------------------------------------------------------


def test_int8_layout() -> None:
    data = C.encode_int8(f32(1, -0.5, 0, 127, -127, 2.5))
    # scale 1.0 (0x3F800000 little-endian), then q; -0.5 and 2.5 round half to even
    assert data == bytes.fromhex("0000803f") + bytes([1, 0, 0, 127, 0x81, 2])
    np.testing.assert_array_equal(C.decode_int8(data, 6), f32(1, 0, 0, 127, -127, 2))


def test_int4_layout_low_nibble_first_and_padding() -> None:
    data = C.encode_int4(f32(7, -7, 1, -3, 2))
    assert data == bytes.fromhex("0000803f") + bytes([0x97, 0xD1, 0x02])
    np.testing.assert_array_equal(C.decode_int4(data, 5), f32(7, -7, 1, -3, 2))


def test_topk_layout() -> None:
    x = f32(0, -3, 1, 3, -1)
    assert C.encode_topk(x, 1) == bytes.fromhex("01000000") + f32(-3).tobytes()
    data = C.encode_topk(x, 3)  # |1| at 2 and 4 tie: the lower index wins
    assert data == np.array([1, 2, 3], "<u4").tobytes() + f32(-3, 1, 3).tobytes()
    np.testing.assert_array_equal(C.decode_topk(data, 5), f32(0, -3, 1, 3, 0))
    assert C.encode_topk(x, 0) == b""
    np.testing.assert_array_equal(C.decode_topk(b"", 5), np.zeros(5, np.float32))


def test_blocks_have_their_own_scales() -> None:
    x = np.concatenate([np.full(256, 1e-3, np.float32), np.full(256, 1e3, np.float32), f32(-5)])
    data = C.encode_int8(x)
    np.testing.assert_allclose(scales_of(data, x.size), [1e-3 / 127, 1e3 / 127, 5 / 127], rtol=1e-6)
    check_bound(x, "int8")
    np.testing.assert_allclose(C.decode_int8(data, x.size), x, rtol=1e-6)


def test_max_scales() -> None:
    assert int(C.MAX_SCALE_INT8.view(np.uint32)) == 0x7C010203
    assert int(C.MAX_SCALE_INT4.view(np.uint32)) == 0x7E124924
    with np.errstate(over="ignore"):
        for qmax, top in ((127, C.MAX_SCALE_INT8), (7, C.MAX_SCALE_INT4)):
            assert np.isfinite(np.float32(qmax) * top)
            assert not np.isfinite(np.float32(qmax) * np.nextafter(top, np.float32(np.inf)))


# ---- round trips ------------------------------------------------------------------------------


@QUANT
@pytest.mark.parametrize("count", [1, 2, 3, 255, 256, 257, 511, 1000, 1024])
def test_round_trip_bound(method: str, count: int) -> None:
    rng = np.random.default_rng(count)
    # magnitudes differing by block and within blocks
    x = (rng.standard_normal(count) * np.exp(rng.uniform(-8, 8, count))).astype(np.float32)
    check_bound(x, method)


@QUANT
def test_zeros(method: str) -> None:
    for count in (0, 1, 5, 256, 300):
        x = np.zeros(count, np.float32)
        data = ENCODE[method](x)
        assert len(data) == C.compressed_size(count, method)
        assert not any(data)  # zero scales, zero values
        np.testing.assert_array_equal(DECODE[method](data, count), x)
    x = np.zeros(600, np.float32)
    x[300] = -2.0  # one block nonzero, the others all-zero
    xh = check_bound(x, method)
    np.testing.assert_array_equal(scales_of(ENCODE[method](x), 600)[[0, 2]], [0, 0])
    assert xh[300] == pytest.approx(-2.0, rel=1e-6) and np.count_nonzero(xh) == 1
    check_bound(f32(-0.0, 0.0, -0.0), method)


@QUANT
def test_single_element(method: str) -> None:
    for v in (3.5, -1e-20, 1.0, -7.0):
        x = f32(v)
        xh = check_bound(x, method)
        assert xh[0] != 0 and np.sign(xh[0]) == np.sign(v)
        np.testing.assert_allclose(xh, x, rtol=1e-6)  # the absmax element is (almost) exact


@QUANT
@pytest.mark.parametrize("count", [1, 7, 255, 257, 513, 1001])
def test_count_not_multiple_of_block(method: str, count: int) -> None:
    x = np.linspace(-3, 5, count, dtype=np.float32)
    data = ENCODE[method](x)
    nb = -(-count // 256)
    per_value = count if method == "int8" else (count + 1) // 2
    assert len(data) == 4 * nb + per_value
    check_bound(x, method)


def test_int4_odd_count_padding() -> None:
    for count in (1, 3, 257, 999):
        x = np.full(count, -6.0, np.float32)
        data = C.encode_int4(x)
        assert data[-1] >> 4 == 0  # the padding nibble
        assert data[-1] & 0xF == 0x9  # -7
        np.testing.assert_allclose(C.decode_int4(data, count), x, rtol=1e-6)


@QUANT
def test_huge_and_tiny_magnitudes(method: str) -> None:
    rng = np.random.default_rng(1)
    for mag in (1e30, 1e-30, 1e-38, 1e-40, 1e-44, F32_MAX):
        x = (rng.uniform(-1, 1, 300) * mag).astype(np.float32)
        x[0] = np.float32(mag)
        check_bound(x, method)
    # F32_MAX: the scale is clamped to the largest valid one and decodes finite
    x = f32(F32_MAX, -F32_MAX, 1.0)
    xh = check_bound(x, method)
    assert scales_of(ENCODE[method](x), 3)[0] == MAX_SCALE[method]
    np.testing.assert_allclose(xh[:2], x[:2], rtol=1e-6)


@QUANT
def test_subnormal_scales_round_up(method: str) -> None:
    qmax = QMAX[method]
    # absmax / qmax is 1.4 subnormal units: to nearest that is 1 unit, which would clip the
    # largest value to qmax units; rounded up (2 units) every value is within scale / 2
    absmax = np.float32(round(1.4 * qmax) * TINY)
    x = np.array([absmax, -absmax, absmax / 3, TINY, 0], np.float32)
    xh = check_bound(x, method)
    assert scales_of(ENCODE[method](x), 5)[0] == np.float32(2 * TINY)
    assert abs(float(xh[0]) - float(absmax)) <= TINY
    # the smallest subnormal alone: absmax / qmax underflows, the scale is still nonzero
    xh = check_bound(f32(TINY, -TINY), method)
    np.testing.assert_array_equal(xh, f32(TINY, -TINY))


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["int8", "int4", "topk"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_refused(method: str, bad: float) -> None:
    x = np.ones(300, np.float32)
    x[299] = bad
    with pytest.raises(ValueError, match="non-finite"):
        C.encode(x, method, **({"k": 3} if method == "topk" else {}))


def test_only_float32_input() -> None:
    for method in ("int8", "int4"):
        with pytest.raises(ValueError, match="float32"):
            ENCODE[method](np.ones(4))  # float64
    with pytest.raises(ValueError, match="float32"):
        C.encode_topk(np.ones(4, np.float16), 1)


@QUANT
def test_wrong_length_refused(method: str) -> None:
    x = np.ones(300, np.float32)
    data = ENCODE[method](x)
    expected = len(data)
    for bad in (data[:-1], data + b"\0", b"", data[4:]):
        with pytest.raises(ValueError, match=f"must be {expected} bytes, got {len(bad)}"):
            DECODE[method](bad, 300)
    with pytest.raises(ValueError):
        DECODE[method](data, 299 if method == "int8" else 298)
    with pytest.raises(ValueError, match="count"):
        DECODE[method](data, -1)


@QUANT
@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, -1.0, -TINY, "above_max"])
def test_invalid_scale_refused(method: str, scale: float | str) -> None:
    value = np.nextafter(MAX_SCALE[method], np.float32(np.inf)) if scale == "above_max" else np.float32(scale)
    data = bytearray(ENCODE[method](np.ones(600, np.float32)))
    data[4:8] = np.float32(value).astype("<f4").tobytes()  # block 1 of 3
    with pytest.raises(ValueError, match=r"scale .* in block 1"):
        DECODE[method](bytes(data), 600)


@QUANT
def test_largest_scale_decodes_finite(method: str) -> None:
    qmax = QMAX[method]
    q = f32(qmax, -qmax, 1)
    data = bytearray(ENCODE[method](q))
    data[0:4] = MAX_SCALE[method].astype("<f4").tobytes()
    xh = DECODE[method](bytes(data), 3)
    assert np.isfinite(xh).all() and xh[0] > 1e38


def test_negative_zero_scale_decodes_to_zeros() -> None:
    data = bytearray(C.encode_int8(np.zeros(3, np.float32)))
    data[0:4] = np.float32(-0.0).tobytes()
    np.testing.assert_array_equal(C.decode_int8(bytes(data), 3), np.zeros(3))


def test_int8_minus_128_refused() -> None:
    data = bytearray(C.encode_int8(np.ones(10, np.float32)))
    data[4 + 7] = 0x80
    with pytest.raises(ValueError, match="-128 at element 7"):
        C.decode_int8(bytes(data), 10)


def test_int4_minus_8_and_padding_refused() -> None:
    good = C.encode_int4(np.ones(5, np.float32))
    for pos, byte, match in ((4, 0x78, "-8 at element 0"), (5, 0x87, "-8 at element 3"), (6, 0x17, "padding")):
        data = bytearray(good)
        data[pos] = byte
        with pytest.raises(ValueError, match=match):
            C.decode_int4(bytes(data), 5)


def _topk_bytes(idx: list[int], values: list[float]) -> bytes:
    return np.array(idx, "<u4").tobytes() + np.array(values, "<f4").tobytes()


@pytest.mark.parametrize(
    ("idx", "values", "match"),
    [
        ([3, 1], [1, 2], "strictly ascending: entry 1 is 1 after 3"),
        ([1, 1], [1, 2], "strictly ascending"),
        ([0, 2, 2, 3], [1, 2, 3, 4], "strictly ascending: entry 2"),
        ([1, 10], [1, 2], "index 10 out of range for 10"),
        ([2**32 - 1], [1], "out of range"),
        ([1, 2], [1, np.nan], "entry 1 is not finite"),
        ([1, 2], [np.inf, 1], "entry 0 is not finite"),
        (list(range(11)), [1.0] * 11, "11 entries for only 10"),
    ],
)
def test_corrupted_topk_refused(idx: list[int], values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        C.decode_topk(_topk_bytes(idx, values), 10)


def test_topk_length_refused() -> None:
    data = _topk_bytes([1, 2], [1, 2])
    for bad in (data[:-1], data + b"\0\0\0\0"):
        with pytest.raises(ValueError, match="multiple of 8"):
            C.decode_topk(bad, 10)


def test_topk_k_range() -> None:
    x = np.ones(5, np.float32)
    for k in (-1, 6):
        with pytest.raises(ValueError, match=r"k must be in \[0, 5\]"):
            C.encode_topk(x, k)
    np.testing.assert_array_equal(C.decode_topk(C.encode_topk(x, 5), 5), x)


# ---- top-k ------------------------------------------------------------------------------------


def _reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))  # |x| desc, index asc
    return np.sort(order[:k])


def test_topk_keeps_exactly_the_k_largest() -> None:
    rng = np.random.default_rng(7)
    for count, k in ((1000, 10), (1000, 1), (1000, 999), (37, 37), (5000, 250)):
        x = rng.standard_normal(count).astype(np.float32)
        x[rng.integers(0, count, count // 4)] = np.float32(0.5)  # many ties
        x[rng.integers(0, count, count // 8)] = np.float32(-0.5)
        data = C.encode_topk(x, k)
        assert len(data) == 8 * k == C.compressed_size(count, "topk", k=k)
        idx = np.frombuffer(data, "<u4", count=k)
        np.testing.assert_array_equal(idx, _reference_topk(x, k))
        xh = C.decode_topk(data, count)
        np.testing.assert_array_equal(xh[idx], x[idx])
        rest = np.delete(np.arange(count), idx)
        assert not xh[rest].any()
        if k < count:
            assert np.abs(x[idx]).min() >= np.abs(x[rest]).max()


def test_k_for_ratio() -> None:
    assert C.k_for_ratio(100, 0.01) == 1
    assert C.k_for_ratio(30, 0.1) == 3  # not ceil(3.0000000000000004)
    assert C.k_for_ratio(100, 0.29) == 29  # not floor(28.999999999999996)
    assert C.k_for_ratio(10, 1e-9) == 1
    assert C.k_for_ratio(0, 0.5) == 0
    assert C.k_for_ratio(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            C.k_for_ratio(10, bad)


# ---- sizes, dispatch, chunks --------------------------------------------------------------------


def test_compressed_size_and_ratios() -> None:
    x = np.ones(1000, np.float32)
    for method in ("int8", "int4"):
        assert len(C.encode(x, method)) == C.compressed_size(1000, method)
    assert len(C.encode(x, "topk", ratio=0.05)) == C.compressed_size(1000, "topk", ratio=0.05) == 400
    assert C.compressed_size(1000, "fp32") == 4000 and C.compressed_size(1000, "bf16") == 2000
    n = 256 * 10**6
    assert C.compression_ratio(n, "int8") == pytest.approx(4 * 256 / 260)  # ~3.94
    assert C.compression_ratio(n, "int4") == pytest.approx(4 * 256 / 132)  # ~7.76
    assert C.compression_ratio(n, "topk", ratio=0.01) == pytest.approx(50)
    assert C.compression_ratio(0, "int8") == float("inf")
    with pytest.raises(ValueError, match="exactly one of k and ratio"):
        C.compressed_size(10, "topk")
    with pytest.raises(ValueError, match="unknown"):
        C.compressed_size(10, "int2")


def test_dispatch_by_method() -> None:
    x = np.arange(-5, 5, dtype=np.float32)
    for method, opts in (("int8", {}), ("int4", {}), ("topk", {"k": 4})):
        data = C.encode(x, method, **opts)
        np.testing.assert_array_equal(C.decode(data, 10, method), DECODE.get(method, C.decode_topk)(data, 10))
    with pytest.raises(ValueError, match="unknown compression method"):
        C.encode(x, "int2")
    with pytest.raises(ValueError, match="unknown compression method"):
        C.decode(b"", 0, "zstd")
    with pytest.raises(ValueError, match="takes no k"):
        C.encode(x, "int8", k=3)
    with pytest.raises(ValueError, match="exactly one"):
        C.encode(x, "topk", k=3, ratio=0.5)


def test_multidimensional_input_is_read_flat() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert C.encode_int8(x) == C.encode_int8(x.reshape(-1))
    assert C.encode_int8(x.T) == C.encode_int8(np.ascontiguousarray(x.T).reshape(-1))


@QUANT
def test_block_aligned_chunks_encode_like_the_whole(method: str) -> None:
    per = C.chunk_elements(method)
    assert per % C.BLOCK == 0
    assert C.compressed_size(per, method) <= CHUNK_BYTES < C.compressed_size(per + C.BLOCK, method)
    assert C.compressed_size(C.chunk_elements(method, MAX_CHUNK_BYTES), method) <= MAX_CHUNK_BYTES
    x = np.random.default_rng(3).standard_normal(5 * 256 + 17).astype(np.float32)
    whole = DECODE[method](ENCODE[method](x), x.size)
    step = 2 * C.BLOCK
    pieces = [DECODE[method](ENCODE[method](x[i : i + step]), x[i : i + step].size) for i in range(0, x.size, step)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    with pytest.raises(ValueError):
        C.chunk_elements("fp32")
    with pytest.raises(ValueError, match="smaller than one"):
        C.chunk_elements(method, 100)


# ---- determinism ------------------------------------------------------------------------------


def test_determinism() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(3000).astype(np.float32)
    for method, opts in (("int8", {}), ("int4", {}), ("topk", {"k": 100})):
        assert C.encode(x, method, **opts) == C.encode(x.copy(), method, **opts)
    deltas = [rng.standard_normal(500).astype(np.float32) for _ in range(5)]
    a, b = C.ErrorFeedback(500), C.ErrorFeedback(500)
    for d in deltas:
        assert a.compress(d, "int4")[0] == b.compress(d.copy(), "int4")[0]


# ---- error feedback ---------------------------------------------------------------------------

EF_METHODS = [("int8", {}), ("int4", {}), ("topk", {"ratio": 0.05}), ("topk", {"k": 1})]


@pytest.mark.parametrize(("method", "opts"), EF_METHODS, ids=["int8", "int4", "topk5%", "top1"])
def test_error_feedback_identity(method: str, opts: dict[str, float]) -> None:
    rng = np.random.default_rng(5)
    size, steps = 777, 50
    ef = C.ErrorFeedback(size)
    sent = np.zeros(size, np.float64)
    total = np.zeros(size, np.float64)
    rounding = np.zeros(size, np.float64)  # the float32 rounding of each c = delta + residual
    biggest = 0.0
    for t in range(steps):
        delta = (rng.standard_normal(size) * np.exp(rng.uniform(-3, 3, size)) * 10.0 ** (t % 5 - 2)).astype(np.float32)
        if t == 7:  # values on and near half-integers of the scale (ties of the rounding)
            delta = np.float32(0.01) * (np.arange(size, dtype=np.float32) % 255 - 127) / np.float32(2)
        r_old = ef.residual.copy()
        c = delta + r_old
        data, decoded = ef.compress(delta, method, **opts)
        np.testing.assert_array_equal(decoded, C.decode(data, size, method))
        r_new = ef.residual
        # exact per step: decoded + residual == c, bit for bit (c - decoded is exact)
        assert np.array_equal((decoded + r_new).view(np.uint32), c.view(np.uint32))
        np.testing.assert_array_equal(r_new.astype(np.float64), c.astype(np.float64) - decoded.astype(np.float64))
        sent += decoded
        total += delta
        rounding += c.astype(np.float64) - (delta.astype(np.float64) + r_old.astype(np.float64))
        biggest = max(biggest, float(np.abs(delta).max()))
    final = ef.residual.astype(np.float64)
    # sum(decoded) + residual == sum(delta) up to the float32 roundings of c ...
    np.testing.assert_allclose(sent + final, total, rtol=1e-6, atol=1e-6 * biggest * steps)
    # ... and exactly those (to float64 accumulation precision): compression itself loses nothing
    np.testing.assert_allclose(sent + final - total, rounding, rtol=0, atol=1e-12 * biggest * steps)
    if method in ("int8", "int4"):
        assert np.abs(final).max() <= biggest  # the residual stays within half a scale


@QUANT
def test_residual_subtraction_is_exact_at_rounding_ties(method: str) -> None:
    """c - decoded is exact in float32 (Sterbenz), so decoded + residual == c bit for bit, also
    for values on, just below and just above the rounding ties q + 1/2, subnormal to huge."""
    rng = np.random.default_rng(2)
    qmax = QMAX[method]
    for exponent in (-140, -130, -60, 0, 60, 120):
        half = rng.integers(-qmax, qmax, 256 * 3).astype(np.float32) + np.float32(0.5)
        toward = rng.choice(np.array([-np.inf, 0, np.inf], np.float32), half.size)
        c = np.nextafter(half, toward).astype(np.float32) * np.float32(2.0**exponent)
        c[::256] = np.float32(qmax * 2.0**exponent)  # absmax: a power-of-two scale
        decoded = DECODE[method](ENCODE[method](c), c.size)
        residual = c - decoded
        assert np.array_equal((decoded + residual).view(np.uint32), c.view(np.uint32))
        np.testing.assert_array_equal(residual.astype(np.float64), c.astype(np.float64) - decoded.astype(np.float64))


def test_error_feedback_refusals_leave_the_residual() -> None:
    ef = C.ErrorFeedback(300)
    ef.compress(np.linspace(-1, 1, 300, dtype=np.float32), "int4")
    before = ef.state_dict()["residual"]
    assert before.any()
    bad = np.ones(300, np.float32)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ef.compress(bad, "int8")
    with pytest.raises(ValueError, match="299 elements"):
        ef.compress(np.ones(299, np.float32), "int8")
    with pytest.raises(ValueError, match="float32"):
        ef.compress(np.ones(300), "int8")
    with pytest.raises(ValueError, match="unknown"):
        ef.compress(np.ones(300, np.float32), "int2")
    with pytest.raises(ValueError, match="exactly one"):
        ef.compress(np.ones(300, np.float32), "topk")
    with pytest.raises(ValueError):
        ef.residual[0] = 1  # read-only view
    np.testing.assert_array_equal(ef.residual, before)
    ef.reset()
    assert not ef.residual.any()
    # delta + residual overflowing to inf is refused too
    ef.load_state_dict({"residual": np.full(300, F32_MAX, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        ef.compress(np.full(300, F32_MAX, np.float32), "int8")
    np.testing.assert_array_equal(ef.residual, np.full(300, F32_MAX, np.float32))


def test_state_dict_round_trip() -> None:
    rng = np.random.default_rng(9)
    deltas = [rng.standard_normal(1000).astype(np.float32) for _ in range(6)]
    a = C.ErrorFeedback(1000)
    for d in deltas[:3]:
        a.compress(d, "topk", ratio=0.1)
    state = a.state_dict()
    assert set(state) == {"residual"} and state["residual"].dtype == np.float32
    np.testing.assert_array_equal(state["residual"], a.residual)
    state["residual"] += 1  # a copy: the residual is unchanged
    assert not np.array_equal(state["residual"], a.residual)
    state = a.state_dict()
    b = C.ErrorFeedback(1000)
    b.load_state_dict(state)
    state["residual"][:] = 0  # loaded as a copy
    np.testing.assert_array_equal(b.residual, a.residual)
    for d in deltas[3:]:  # they continue identically
        assert a.compress(d, "topk", ratio=0.1)[0] == b.compress(d, "topk", ratio=0.1)[0]
    good = a.state_dict()["residual"]
    bads = [
        ({"residual": good[:-1]}, "shape"),
        ({"residual": good.reshape(10, 100)}, "shape"),
        ({"residual": good.astype(np.float64)}, "float32"),
        ({"residual": list(good)}, "list"),
        ({"residual": good, "extra": good}, "key"),
        ({}, "key"),
        ({"residual": np.where(np.arange(1000) == 3, np.float32(np.inf), good)}, "non-finite"),
    ]
    for bad, match in bads:
        with pytest.raises(ValueError, match=match):
            b.load_state_dict(bad)
    np.testing.assert_array_equal(b.residual, a.residual)


# ---- property test ----------------------------------------------------------------------------

FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
PROPERTY = settings(max_examples=150, deadline=None, database=None, derandomize=True)


@PROPERTY
@given(x=hnp.arrays(np.float32, st.integers(0, 700), elements=FINITE_F32), method=st.sampled_from(["int8", "int4"]))
def test_round_trip_bound_property(x: np.ndarray, method: str) -> None:
    check_bound(x, method)
    assert ENCODE[method](x) == ENCODE[method](x.copy())


@PROPERTY
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=FINITE_F32), data=st.data())
def test_topk_property(x: np.ndarray, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, x.size))
    encoded = C.encode_topk(x, k)
    idx = np.frombuffer(encoded, "<u4", count=k)
    np.testing.assert_array_equal(idx, _reference_topk(x, k))
    xh = C.decode_topk(encoded, x.size)
    np.testing.assert_array_equal(xh[idx], x[idx])
    assert np.count_nonzero(xh) == np.count_nonzero(x[idx])


# ---- messages sent as several chunks ----------------------------------------------------------


def test_topk_chunks_fit_the_chunk_limit_even_dense() -> None:
    per = C.chunk_elements("topk")
    assert C.compressed_size(per, "topk", k=per) <= MAX_CHUNK_BYTES


@pytest.mark.parametrize("method", ["int8", "int4", "topk"])
def test_pieces_encode_each_chunk_on_its_own(method: str) -> None:
    """encode_pieces = each piece encoded alone (block boundaries restart at each piece, top-k
    keeps its share per piece), and the decoded array is the pieces' decodings in place."""
    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    pieces = [(0, 300), (300, 17), (317, 683)]
    ratio = 0.1 if method == "topk" else None
    data, decoded = C.encode_pieces(x, pieces, method, ratio=ratio)
    assert len(data) == 3
    for (off, n), d in zip(pieces, data, strict=True):
        alone = C.encode(x[off : off + n], method, ratio=ratio) if ratio else C.encode(x[off : off + n], method)
        assert d == alone
        np.testing.assert_array_equal(decoded[off : off + n], C.decode(d, n, method))


def test_pieces_must_lie_inside_and_not_overlap() -> None:
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="not inside"):
        C.encode_pieces(x, [(5, 6)], "int8")
    with pytest.raises(ValueError, match="overlaps"):
        C.encode_pieces(x, [(0, 5), (4, 2)], "int8")
    with pytest.raises(ValueError, match="ratio"):
        C.encode_pieces(x, [(0, 10)], "topk")
    with pytest.raises(ValueError, match="ratio"):
        C.encode_pieces(x, [(0, 10)], "int8", ratio=0.5)


@pytest.mark.parametrize("method", ["int8", "int4", "topk"])
def test_error_feedback_over_pieces_keeps_the_identity(method: str) -> None:
    """Per step, decoded + new residual == delta + old residual, bit for bit, chunk by chunk."""
    rng = np.random.default_rng(9)
    ef = C.ErrorFeedback(700)
    pieces = [(0, 256), (256, 100), (356, 344)]
    ratio = 0.05 if method == "topk" else None
    for _ in range(4):
        delta = rng.standard_normal(700).astype(np.float32)
        c = delta + ef.residual
        _, decoded = ef.compress_pieces(delta, method, pieces, ratio=ratio)
        np.testing.assert_array_equal(decoded + ef.residual, c)
    with pytest.raises(ValueError, match="cover"):
        ef.compress_pieces(np.zeros(700, np.float32), method, pieces[:2], ratio=ratio)
