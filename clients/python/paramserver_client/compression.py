"""Compressed pseudo-gradients for DiLoCo-style outer steps (numpy only).

A worker that took H local steps pushes the pseudo-gradient ``delta = theta_start - theta_local``
(flat fp32). This module encodes such a flat fp32 array in one of three lossy wire encodings, and
keeps the worker-side error-feedback residual (:class:`ErrorFeedback`). Everything is
little-endian; an array of any shape is read flat, in C order. Encoders refuse non-finite input
(``ValueError``); decoders validate their input exactly and never return a non-finite value.

Wire layouts, for ``count`` elements and ``nb = ceil(count / BLOCK)`` blocks of :data:`BLOCK`
(256) consecutive elements (the last block holds the ``count - (nb - 1) * BLOCK`` remaining ones):

``int8`` (blockwise absmax, :func:`encode_int8`; ``4 * nb + count`` bytes)
    ``nb`` float32 scales (4 bytes each, little-endian), block order; then ``count`` int8 values
    ``q`` (two's complement), element order. Element ``i`` decodes to
    ``float32(q[i]) * scale[i // BLOCK]``, one float32 multiplication (round to nearest even).

    Decoders refuse (INVALID_ARGUMENT): a length other than ``4 * nb + count``; a scale that is
    NaN, infinite, negative or above :data:`MAX_SCALE_INT8` (``0x7C010203`` ~ 2.679e36, the largest
    float32 whose product with 127 is finite); a ``q`` of -128 (``0x80``). A scale of 0 (either
    sign) decodes its block to zeros.

    The encoder (this module's reference; decoders do not depend on it): ``absmax`` is the
    largest ``|x|`` of the block; ``scale = min(ceil32(absmax / 127), MAX_SCALE_INT8)`` where
    ``ceil32`` rounds the exact quotient up to a float32 (so ``|x| / scale <= 127`` holds
    exactly; nearest rounding could round a subnormal scale far down and clip the block's
    largest values); ``scale = 0`` for an all-zero block. ``q = clip(rint(x / scale), -127,
    127)`` with the division in float32 and ``rint`` rounding half to even; ``q = 0`` in a block
    whose scale is 0. Hence ``|x - x_hat| <= scale * (0.5 + 2 * 127 * 2**-24)`` per element
    (scale/2, plus the float32 rounding of the division and of the decoding product).

``int4`` (blockwise absmax, :func:`encode_int4`; ``4 * nb + ceil(count / 2)`` bytes)
    ``nb`` float32 scales as above, then ``ceil(count / 2)`` bytes of two 4-bit values each:
    element ``2j`` in the low nibble of byte ``j``, element ``2j + 1`` in its high nibble; each
    nibble is a two's-complement value ``q`` in [-7, 7] (``0x9``-``0xF`` are -7..-1). For an odd
    ``count`` the last byte's high nibble is 0. Decoding: ``float32(q) * scale`` as for int8.

    Decoders refuse: a wrong length; a scale that is NaN, infinite, negative or above
    :data:`MAX_SCALE_INT4` (``0x7E124924`` ~ 4.861e37); a nibble ``0x8`` (-8); a nonzero padding
    nibble. The encoder is int8's with 7 for 127 (``|x - x_hat| <= scale * (0.5 + 14 * 2**-24)``).

``topk`` (sparsification, :func:`encode_topk`; ``8 * k`` bytes)
    ``k`` uint32 indices (little-endian), strictly ascending, then the ``k`` float32 values at
    those indices (same order). Decodes to a dense array of ``count`` float32, zero elsewhere.
    ``k`` is implied by the length (a multiple of 8; ``k = 0`` is the empty message).

    Decoders refuse: a length not a multiple of 8; indices not strictly ascending (unsorted or
    repeated) or ``>= count``; a non-finite value. The encoder keeps the ``k`` largest ``|x|``,
    ties broken by the lower index.

Error feedback (:class:`ErrorFeedback`): the worker compresses ``c = delta + residual`` and keeps
``residual = c - decode(encode(c))``. Exactly, in float32, at every step: ``decoded + residual_new
== c`` bit for bit (top-k: trivially; int8/int4: ``c - decoded`` is exact by Sterbenz's lemma,
since a nonzero decoded value lies within a factor 2 of ``c`` and a zero one leaves ``c``).
Across steps, ``sum(decoded_t) + residual_T == sum(delta_t)`` holds exactly only in real
arithmetic up to the float32 rounding of each ``c_t = delta_t + residual_{t-1}`` (one rounding
per element and step, at most half an ulp of ``c_t``): nothing is lost by the compression itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

F32Array = npt.NDArray[np.float32]

#: Elements per quantisation block of int8 / int4 (each block has its own float32 scale).
BLOCK: Final = 256

#: Names of the compression methods.
METHODS: Final = ("int8", "int4", "topk")

#: Largest value of a quantised int8 / int4 element (the most negative is its negation).
INT8_MAX: Final = 127
INT4_MAX: Final = 7

_F32 = np.float32
_UP = np.float32(np.inf)
_DOWN = np.float32(-np.inf)


def _max_scale(qmax: int) -> np.float32:
    """The largest float32 scale whose product with ``qmax`` is finite in float32."""
    s = np.float32(float(np.finfo(np.float32).max) / qmax)
    q = np.float32(qmax)
    with np.errstate(over="ignore"):
        while np.isfinite(q * np.nextafter(s, _UP)):
            s = np.nextafter(s, _UP)
        while not np.isfinite(q * s):
            s = np.nextafter(s, _DOWN)
    return s


#: Largest valid int8 scale (float32 bits 0x7C010203): 127 * scale stays finite.
MAX_SCALE_INT8: Final = _max_scale(INT8_MAX)
#: Largest valid int4 scale (float32 bits 0x7E124924): 7 * scale stays finite.
MAX_SCALE_INT4: Final = _max_scale(INT4_MAX)


def _flat_f32(x: npt.NDArray[np.generic]) -> F32Array:
    """``x`` as a flat C-order float32 array (a view when possible); refuses other dtypes."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"expected a float32 array, got {getattr(x, 'dtype', type(x).__name__)}")
    flat: F32Array = np.ravel(x)
    return flat


def num_blocks(count: int) -> int:
    """Blocks of :data:`BLOCK` elements (the last one possibly partial) for ``count`` elements."""
    return -(-count // BLOCK)


# ---- blockwise absmax quantisation -----------------------------------------------------------


def _scales(absmax: F32Array, qmax: int, max_scale: np.float32) -> F32Array:
    """``min(ceil32(absmax / qmax), max_scale)``: the exact quotient rounded up to float32."""
    a64 = absmax.astype(np.float64)
    s = (a64 / qmax).astype(np.float32)
    # s * qmax is exact in float64 (24 + 7 bits); s is within an ulp of the quotient
    low = s.astype(np.float64) * qmax < a64
    if low.any():
        s[low] = np.nextafter(s[low], _UP)
    np.minimum(s, max_scale, out=s)
    return s


def _quantise_blocks(blocks: F32Array, qmax: int, max_scale: np.float32) -> tuple[F32Array, npt.NDArray[np.int8]]:
    """Scales and int8 values of a 2-D (blocks, elements) array."""
    absmax = np.max(np.abs(blocks), axis=1)
    if not np.isfinite(absmax).all():
        raise ValueError("cannot quantise non-finite values (NaN or inf)")
    scales = _scales(absmax, qmax, max_scale)
    divisor = np.where(scales == 0, np.float32(1), scales)  # an all-zero block: q = 0 / 1 = 0
    t = blocks / divisor[:, None]
    np.rint(t, out=t)
    np.clip(t, -qmax, qmax, out=t)  # only bites for a scale clamped to max_scale
    return scales, t.astype(np.int8)


def _quantise(x: npt.NDArray[np.generic], qmax: int, max_scale: np.float32) -> tuple[F32Array, npt.NDArray[np.int8]]:
    """Blockwise scales (``num_blocks(count)``) and values (``count``) of a float32 array."""
    flat = _flat_f32(x)
    n = flat.size
    full = n // BLOCK
    parts_s: list[F32Array] = []
    parts_q: list[npt.NDArray[np.int8]] = []
    if full:
        s, q = _quantise_blocks(flat[: full * BLOCK].reshape(full, BLOCK), qmax, max_scale)
        parts_s.append(s)
        parts_q.append(q.reshape(-1))
    if n > full * BLOCK:
        s, q = _quantise_blocks(flat[full * BLOCK :].reshape(1, -1), qmax, max_scale)
        parts_s.append(s)
        parts_q.append(q.reshape(-1))
    if len(parts_s) == 1:
        return parts_s[0], parts_q[0]
    if not parts_s:
        return np.zeros(0, np.float32), np.zeros(0, np.int8)
    return np.concatenate(parts_s), np.concatenate(parts_q)


def _read_scales(data: bytes | memoryview, nb: int, max_scale: np.float32, name: str) -> F32Array:
    scales = np.frombuffer(data, dtype="<f4", count=nb).astype(np.float32)
    # NaN fails both comparisons; -0.0 passes (it decodes to zeros like +0.0)
    bad = ~((scales >= 0) & (scales <= max_scale))
    if bad.any():
        block = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"invalid {name} scale {float(scales[block])!r} in block {block} (must be finite, >= 0 and <= {float(max_scale)!r})"
        )
    return scales


def _dequantise(q: npt.NDArray[np.int8], scales: F32Array, count: int) -> F32Array:
    """``float32(q) * scale`` per block, as a new float32 array of ``count`` elements."""
    out = np.empty(count, dtype=np.float32)
    full = count // BLOCK
    if full:
        np.multiply(q[: full * BLOCK].reshape(full, BLOCK), scales[:full, None], out=out[: full * BLOCK].reshape(full, BLOCK))
    if count > full * BLOCK:
        np.multiply(q[full * BLOCK : count], scales[full], out=out[full * BLOCK :])
    return out


def _check_length(data: bytes | memoryview, expected: int, name: str, count: int) -> None:
    if len(data) != expected:
        raise ValueError(f"{name} data for {count} elements must be {expected} bytes, got {len(data)}")


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


def encode_int8(x: F32Array) -> bytes:
    """Encode a float32 array (read flat) as blockwise-absmax int8: ``nb`` float32 scales, then
    one int8 per element (see the module docstring). Raises ValueError on NaN or inf."""
    scales, q = _quantise(x, INT8_MAX, MAX_SCALE_INT8)
    return b"".join([scales.astype("<f4", copy=False).tobytes(), q.tobytes()])


def decode_int8(data: bytes | memoryview, count: int) -> F32Array:
    """Decode :func:`encode_int8` data of ``count`` elements to a new float32 array. Raises
    ValueError on a wrong length, an invalid scale or a value of -128."""
    _check_count(count)
    nb = num_blocks(count)
    _check_length(data, 4 * nb + count, "int8", count)
    scales = _read_scales(data, nb, MAX_SCALE_INT8, "int8")
    q = np.frombuffer(data, dtype=np.int8, offset=4 * nb)
    if count and q.min() < -INT8_MAX:
        raise ValueError(f"invalid int8 value -128 at element {int(np.argmin(q))} (values must be in [-127, 127])")
    return _dequantise(q, scales, count)


#: int4 values of each byte (low nibble, high nibble), sign-extended.
_INT4_PAIRS: Final = ((((np.arange(256, dtype=np.int16)[:, None] >> np.array([0, 4])) & 0xF) ^ 8) - 8).astype(np.int8)


def encode_int4(x: F32Array) -> bytes:
    """Encode a float32 array (read flat) as blockwise-absmax int4: ``nb`` float32 scales, then
    two values per byte, low nibble first (see the module docstring). Raises ValueError on NaN
    or inf."""
    scales, q = _quantise(x, INT4_MAX, MAX_SCALE_INT4)
    nib = q.view(np.uint8) & np.uint8(0x0F)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    packed = nib[0::2] | (nib[1::2] << np.uint8(4))
    return b"".join([scales.astype("<f4", copy=False).tobytes(), packed.tobytes()])


def decode_int4(data: bytes | memoryview, count: int) -> F32Array:
    """Decode :func:`encode_int4` data of ``count`` elements to a new float32 array. Raises
    ValueError on a wrong length, an invalid scale, a nibble of -8 or a nonzero padding nibble."""
    _check_count(count)
    nb = num_blocks(count)
    _check_length(data, 4 * nb + (count + 1) // 2, "int4", count)
    scales = _read_scales(data, nb, MAX_SCALE_INT4, "int4")
    packed = np.frombuffer(data, dtype=np.uint8, offset=4 * nb)
    if count % 2 and packed[-1] >> 4:
        raise ValueError("invalid int4 data: the padding nibble (high nibble of the last byte) must be 0")
    q = _INT4_PAIRS[packed].reshape(-1)
    if q.size and q.min() < -INT4_MAX:
        raise ValueError(f"invalid int4 value -8 at element {int(np.argmin(q))} (values must be in [-7, 7])")
    return _dequantise(q, scales, count)


# ---- top-k sparsification -------------------------------------------------------------------


def k_for_ratio(count: int, ratio: float) -> int:
    """The ``k`` of a top-k ``ratio`` in (0, 1]: ``round(ratio * count)``, at least 1 (0 for
    ``count == 0``), at most ``count``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"top-k ratio must be in (0, 1], got {ratio!r}")
    _check_count(count)
    return min(count, max(1, round(ratio * count)))


def topk_indices(x: F32Array, k: int) -> npt.NDArray[np.int64]:
    """Ascending indices of the ``k`` largest ``|x|`` of a float32 array (read flat), ties broken
    by the lower index. Raises ValueError on NaN or inf, or ``k`` outside [0, x.size]."""
    flat = _flat_f32(x)
    n = flat.size
    if not 0 <= k <= n:
        raise ValueError(f"top-k k must be in [0, {n}], got {k}")
    if not np.isfinite(flat).all():
        raise ValueError("cannot sparsify non-finite values (NaN or inf)")
    if k == n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.abs(flat)
    threshold = np.partition(a, n - k)[n - k]  # the k-th largest |x|
    above = np.flatnonzero(a > threshold)
    at = np.flatnonzero(a == threshold)[: k - above.size]  # the lowest indices among the ties
    return np.sort(np.concatenate([above, at]))


def encode_topk(x: F32Array, k: int) -> bytes:
    """Encode the ``k`` largest ``|x|`` of a float32 array (read flat; ties: the lower index):
    ``k`` uint32 indices ascending, then their ``k`` float32 values. Raises ValueError on NaN or
    inf, ``k`` outside [0, x.size], or more than 2**32 elements."""
    flat = _flat_f32(x)
    if flat.size > 1 << 32:
        raise ValueError(f"top-k indices are uint32: at most 2**32 elements, got {flat.size}")
    idx = topk_indices(flat, k)
    return b"".join([idx.astype("<u4").tobytes(), flat[idx].astype("<f4", copy=False).tobytes()])


def decode_topk(data: bytes | memoryview, count: int) -> F32Array:
    """Decode :func:`encode_topk` data to a dense float32 array of ``count`` elements (zeros
    elsewhere). Raises ValueError on a length not a multiple of 8, more than ``count`` entries,
    indices not strictly ascending or ``>= count``, or a non-finite value."""
    _check_count(count)
    if len(data) % 8:
        raise ValueError(f"top-k data must be a multiple of 8 bytes (uint32 index + float32 value), got {len(data)}")
    k = len(data) // 8
    if k > count:
        raise ValueError(f"top-k data holds {k} entries for only {count} elements")
    idx = np.frombuffer(data, dtype="<u4", count=k)
    values = np.frombuffer(data, dtype="<f4", offset=4 * k)
    if k:
        if k > 1 and not (idx[1:] > idx[:-1]).all():
            bad = int(np.flatnonzero(idx[1:] <= idx[:-1])[0]) + 1
            raise ValueError(f"top-k indices must be strictly ascending: entry {bad} is {idx[bad]} after {idx[bad - 1]}")
        if idx[-1] >= count:
            raise ValueError(f"top-k index {idx[-1]} out of range for {count} elements")
        if not np.isfinite(values).all():
            raise ValueError(f"top-k value at entry {int(np.flatnonzero(~np.isfinite(values))[0])} is not finite")
    out = np.zeros(count, dtype=np.float32)
    out[idx] = values
    return out


# ---- by method name ---------------------------------------------------------------------------


def _topk_k(count: int, k: int | None, ratio: float | None) -> int:
    if (k is None) == (ratio is None):
        raise ValueError("top-k needs exactly one of k and ratio")
    if k is not None:
        return k
    assert ratio is not None
    return k_for_ratio(count, ratio)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; use one of {', '.join(METHODS)}")


def encode(x: F32Array, method: str, *, k: int | None = None, ratio: float | None = None) -> bytes:
    """Encode a float32 array with ``method`` ("int8", "int4" or "topk"; top-k takes exactly one
    of ``k`` and ``ratio``, see :func:`k_for_ratio`)."""
    _check_method(method)
    if method != "topk":
        if k is not None or ratio is not None:
            raise ValueError(f"{method} takes no k or ratio")
        return encode_int8(x) if method == "int8" else encode_int4(x)
    flat = _flat_f32(x)
    return encode_topk(flat, _topk_k(flat.size, k, ratio))


def decode(data: bytes | memoryview, count: int, method: str) -> F32Array:
    """Decode ``method`` data of ``count`` elements to a new float32 array."""
    _check_method(method)
    if method == "int8":
        return decode_int8(data, count)
    if method == "int4":
        return decode_int4(data, count)
    return decode_topk(data, count)


def compressed_size(count: int, method: str, *, k: int | None = None, ratio: float | None = None) -> int:
    """Bytes on the wire for ``count`` elements: "int8" ``4 * nb + count``, "int4" ``4 * nb +
    ceil(count / 2)`` (``nb = ceil(count / BLOCK)``), "topk" ``8 * k``; also "fp32" (4 per
    element) and "bf16" / "fp16" (2) for comparison."""
    _check_count(count)
    if method == "int8":
        return 4 * num_blocks(count) + count
    if method == "int4":
        return 4 * num_blocks(count) + (count + 1) // 2
    if method == "topk":
        kk = _topk_k(count, k, ratio)
        if not 0 <= kk <= count:
            raise ValueError(f"top-k k must be in [0, {count}], got {kk}")
        return 8 * kk
    if method in ("fp32", "bf16", "fp16"):
        return count * (4 if method == "fp32" else 2)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join((*METHODS, 'fp32', 'bf16', 'fp16'))}")


def compression_ratio(count: int, method: str, *, k: int | None = None, ratio: float | None = None) -> float:
    """fp32 bytes over compressed bytes (int8 ~ 3.94, int4 ~ 7.76 for large counts; top-k at
    ratio r ~ 1 / (2 r)); inf for an empty message."""
    size = compressed_size(count, method, k=k, ratio=ratio)
    return math.inf if size == 0 else 4 * count / size


def chunk_elements(method: str, chunk_bytes: int = 1 << 20) -> int:
    """Elements per chunk for ``method``: for int8 / int4 the most elements, a multiple of
    :data:`BLOCK`, whose encoding fits in ``chunk_bytes`` (default 1 MiB, codec.CHUNK_BYTES), so
    that chunks that start on block boundaries quantise exactly as the whole array does; for
    top-k the elements of ``chunk_bytes`` of fp32 (its encoding is at most twice that, at k =
    count)."""
    if method == "topk":
        return max(1, chunk_bytes // 4)
    per_block = compressed_size(BLOCK, method) if method in ("int8", "int4") else 0
    if not per_block:
        raise ValueError(f"chunk_elements is for int8, int4 and topk, not {method!r}")
    blocks = chunk_bytes // per_block
    if blocks < 1:
        raise ValueError(f"chunk_bytes {chunk_bytes} is smaller than one {method} block ({per_block} bytes)")
    return blocks * BLOCK


def encode_pieces(
    x: F32Array, pieces: Sequence[tuple[int, int]], method: str, *, ratio: float | None = None
) -> tuple[list[bytes], F32Array]:
    """Encode each piece ``(offset, count)`` of the flat float32 array ``x`` on its own (as the
    wire carries one chunk each; top-k keeps ``k_for_ratio(count, ratio)`` per piece); return the
    encodings, in piece order, and ``x`` as the receiver decodes it (elements outside every
    piece are 0). Pieces must lie inside ``x`` and not overlap."""
    _check_method(method)
    if (method == "topk") != (ratio is not None):
        raise ValueError("top-k takes a ratio; int8 / int4 take none")
    flat = _flat_f32(x)
    decoded = np.zeros(flat.size, dtype=np.float32)
    seen = np.zeros(flat.size, dtype=bool)
    out = []
    for offset, count in pieces:
        if not (0 <= offset and 0 < count and offset + count <= flat.size):
            raise ValueError(f"piece ({offset}, {count}) is not inside the array of {flat.size} elements")
        if seen[offset : offset + count].any():
            raise ValueError(f"piece ({offset}, {count}) overlaps another")
        seen[offset : offset + count] = True
        part = flat[offset : offset + count]
        data = encode(part, method, ratio=ratio) if method == "topk" else encode(part, method)
        decoded[offset : offset + count] = decode(data, count, method)
        out.append(data)
    return out, decoded


# ---- error feedback ---------------------------------------------------------------------------


class ErrorFeedback:
    """Worker-side error feedback: the float32 residual of everything compressed away so far.

    Each :meth:`compress` sends ``c = delta + residual`` compressed and keeps ``residual = c -
    decoded``, so that what the service has received plus the residual is what the worker meant
    to send (see the module docstring for what holds exactly).
    """

    def __init__(self, size: int) -> None:
        """A zero residual of ``size`` elements (the flat model size)."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._residual: F32Array = np.zeros(size, dtype=np.float32)

    @property
    def size(self) -> int:
        """Elements of the residual."""
        return int(self._residual.size)

    @property
    def residual(self) -> F32Array:
        """A read-only view of the current residual."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def reset(self) -> None:
        """Zero the residual (e.g. after a rollback of the job)."""
        self._residual.fill(0)

    def compress(self, delta: F32Array, method: str, *, k: int | None = None, ratio: float | None = None) -> tuple[bytes, F32Array]:
        """Compress ``delta + residual`` with ``method`` ("int8", "int4" or "topk" with ``k`` or
        ``ratio``); update the residual; return the wire bytes and the values they decode to.

        ``delta`` is a float32 array of :attr:`size` elements (read flat). On error (wrong size
        or dtype, a non-finite sum, bad options) the residual is left unchanged."""
        _check_method(method)
        flat = _flat_f32(delta)
        if flat.size != self._residual.size:
            raise ValueError(f"delta has {flat.size} elements, the residual {self._residual.size}")
        with np.errstate(over="ignore"):  # an overflow to inf is refused by the encoder
            c = flat + self._residual
        data = encode(c, method, k=k, ratio=ratio)
        decoded = decode(data, c.size, method)
        np.subtract(c, decoded, out=self._residual)
        return data, decoded

    def compress_pieces(
        self, delta: F32Array, method: str, pieces: Sequence[tuple[int, int]], *, ratio: float | None = None
    ) -> tuple[list[bytes], F32Array]:
        """:meth:`compress` for a message sent as several chunks: ``delta + residual`` encoded
        piece by piece (:func:`encode_pieces`; the pieces must cover the whole array); the
        residual becomes what the pieces' decodings miss. Returns the encodings and the decoded
        values. On error the residual is left unchanged."""
        flat = _flat_f32(delta)
        if flat.size != self._residual.size:
            raise ValueError(f"delta has {flat.size} elements, the residual {self._residual.size}")
        if sum(n for _, n in pieces) != flat.size:
            raise ValueError(f"the pieces cover {sum(n for _, n in pieces)} of {flat.size} elements")
        with np.errstate(over="ignore"):
            c = flat + self._residual
        data, decoded = encode_pieces(c, pieces, method, ratio=ratio)
        np.subtract(c, decoded, out=self._residual)
        return data, decoded

    def state_dict(self) -> dict[str, F32Array]:
        """``{"residual": a copy of the residual}``."""
        return {"residual": self._residual.copy()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore a :meth:`state_dict`: a finite float32 residual of :attr:`size` elements
        (copied). Raises ValueError otherwise."""
        if set(state) != {"residual"}:
            raise ValueError(f"expected a state with the key 'residual' only, got {sorted(state)}")
        r = state["residual"]
        if not isinstance(r, np.ndarray) or r.dtype != np.float32 or r.shape != self._residual.shape:
            what = f"{r.dtype} {r.shape}" if isinstance(r, np.ndarray) else type(r).__name__
            raise ValueError(f"residual must be a float32 array of shape {self._residual.shape}, got {what}")
        if not np.isfinite(r).all():
            raise ValueError("residual holds non-finite values")
        self._residual[...] = r
