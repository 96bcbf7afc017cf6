"""Exact top-n by inner product over an item table: an int8 scan with a certificate, fp32 otherwise.

Retrieval reads the whole table once per query, so its cost is the table's bytes and the arithmetic
on them. At 1M items of dimension 64, an fp32 ``mv`` + ``topk`` took 12.2 ms on one core here; the
scan below took 4.4-5.2 ms at n = 10 in the serving bench (about 5 ms at n = 120, timed alone).
Its answer is exact up to fp32 rounding, as a plain fp32 scan's is (see :class:`ExactScan`).

1. **An int8 scan with an upper bound per row.** Each row is quantised once per version with its
   own scale (``w ≈ s_w c_w``, ``c_w`` int8, ``s_w = max|w| / 127``), and each query likewise
   (``u ≈ s_u q``). ``torch._int_mm`` (int8 x int8 → int32, VNNI on this CPU) computes every
   ``q·c_w`` in 2.5-2.9 ms at 1M, against 11.8 ms for the fp32 ``mv``. The rounding error is
   bounded per row:

       |u·w - s_u s_w q·c_w| ≤ s_w/2 ‖u‖₁ + s_u/2 ‖w‖₁ + ¼ D s_u s_w

   (with ``e_u = u - s_u q`` and ``e_w = w - s_w c_w``, each entry at most half a step:
   ``u·w - (u - e_u)·(w - e_w) = u·e_w + e_u·w - e_u·e_w``), so ``s_u · bound_w``, with
   ``bound_w = s_w (q·c_w + ‖u‖₁/(2 s_u) + ¼ D) + ‖w‖₁/2``, is at least the row's true score.
   Computing it takes two vector operations over per-row constants kept with the codes.
2. **A certified shortlist.** The ``m = 2n + 64`` rows with the highest bounds are re-scored
   exactly in fp32. Any other row scores at most ``s_u`` times the shortlist's lowest bound, so when
   the shortlist's n-th exact score reaches that, its top n is the table's top n. When it does not,
   the query is scanned again in fp32. :class:`ScanCounts` counts both; ``/metrics`` shows them.
   Synthetic tables certified every query, Gaussian rows or rows whose norms spread log-normally,
   at D = 32 to 128 and n = 10 to 300 (``bench/serving_latency.py`` prints the rate). The bound
   grows with D faster than the gaps between the top scores, so wider tables
   (:data:`QUANTIZE_MAX_DIM`) are scanned in fp32, and a table whose queries keep falling back
   gives up the int8 scan (more than a quarter of a window of :data:`PROBATION` queries).
3. **A blocked top-k** (:func:`block_topk`). ``torch.topk`` over 1M scores took 2.1 ms. The top
   ``m`` can only lie in the ``m`` blocks of 64 with the highest maxima, so ``topk`` runs over
   the block maxima and then over those blocks: 0.14 ms. The fp32 scan uses it too (10.0 ms).

What was measured and not kept is in ``docs/benchmarks.md`` (serving latency, the int8 scan).

``torch._int_mm`` is a private operator (it backs torch's own int8 quantisation): if this build of
torch lacks it, or with ``quantized=False`` (``FRESHREC_SERVE__QUANTIZED_SCAN``), below
:data:`QUANTIZE_FROM` rows, or when the table holds NaN or inf, every query runs the fp32 scan; so do
zero and tiny queries.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["ExactScan", "ScanCounts", "block_topk"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

BLOCK = 64  # scores per block in block_topk: 0.14 ms at 1M, against 0.17 (32) and 0.18 (125)
QUANTIZE_FROM = 65_536  # rows; below, the fp32 scan is as fast (50k rows: 0.39 ms either way)
# Widest rows quantised. The bound grows with D faster than the spread of the top scores: at 100k
# Gaussian rows and n=120, 10 of 10 queries certified at D=128, 3 at D=256 and none at 512.
QUANTIZE_MAX_DIM = 128
# The int8 scans of one table are judged in windows of this many: if more than this share of a
# window fell back, the table is scanned in fp32 only (each fallback pays for both scans).
PROBATION = 64
MAX_FALLBACK_SHARE = 0.25
_TINY = 1e-30  # rows and queries whose largest entry is below this are not quantised (no subnormals)
_HUGE = 1e30  # a table with a larger entry is not quantised: its bounds could overflow fp32
_CHUNK = 8_192  # rows quantised at a time: the build's temporaries stay at 16-32 MiB


@dataclass
class ScanCounts:
    """Queries by how they were scanned: int8 and certified, int8 then again in fp32 (fallback), or
    in fp32 alone (a table not quantised, a zero or tiny query, or int8 given up on this table).

    Plain integers, incremented without a lock: serving calls the scan from one thread (the API's
    event loop)."""

    certified: int = 0
    fallback: int = 0
    fp32: int = 0


def block_topk(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, m)`` (values and positions, best first), for 1-D ``scores``, faster when
    ``scores`` is long: the top ``m`` lie in the ``m`` blocks of :data:`BLOCK` with the highest
    maxima, so ``topk`` runs over the block maxima and then over those blocks only.

    >>> s = torch.tensor([5, 1, 9, 3] * 50, dtype=torch.int32)
    >>> block_topk(s, 3)[0].tolist()
    [9, 9, 9]
    """
    n = scores.shape[0]
    m = min(m, n)
    blocks = n // BLOCK
    if blocks < 4 * m:  # few blocks: one topk is as fast (at 10k scores, 0.09 against 0.16 ms)
        values, positions = torch.topk(scores, m)
        return values, positions
    maxima = scores[: blocks * BLOCK].view(blocks, BLOCK).amax(dim=1)
    best = torch.topk(maxima, m, sorted=False).indices
    candidates = (best[:, None] * BLOCK + torch.arange(BLOCK)).view(-1)
    if blocks * BLOCK < n:  # the tail, shorter than a block, is always a candidate
        candidates = torch.cat((candidates, torch.arange(blocks * BLOCK, n)))
    values, picked = torch.topk(scores[candidates], m)
    return values, candidates[picked]


@functools.cache
def _int_mm_works() -> bool:
    try:
        a = torch.ones((1, 8), dtype=torch.int8)
        return bool(torch._int_mm(a, a.t()).item() == 8)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.warning("torch._int_mm is unavailable (%s): retrieval scans in fp32", error)
        return False


class ExactScan:
    """The exact top-n of ``vectors @ query`` over a read-only table; see the module docstring.

    Exact means exact up to fp32 rounding, as a plain fp32 scan is: the n rows with the highest inner
    products, where rows whose scores lie within fp32 rounding of each other (ties included) may
    come in either order, or either one at the n-th place. Scores are fp32 products, which can
    differ from a full fp32 scan's in the last bit.

    Not thread-safe: one thread calls it (the API's event loop), as :class:`ScanCounts` says."""

    def __init__(
        self,
        vectors: FloatArray,
        *,
        quantized: bool = True,
        counts: ScanCounts | None = None,
        min_rows: int = QUANTIZE_FROM,
    ) -> None:
        self.table = torch.from_numpy(vectors)  # (N, D) float32, shares memory
        self.counts = counts if counts is not None else ScanCounts()
        self._codes: torch.Tensor | None = None
        self._attempts = self._fallbacks = 0
        rows, dim = vectors.shape
        if quantized and rows >= min_rows and 0 < dim <= QUANTIZE_MAX_DIM and _int_mm_works():
            self._quantize(vectors)

    @property
    def quantized(self) -> bool:
        """Whether queries take the int8 scan (not below the size, above the width, with NaN in
        the table, or once given up after the probation)."""
        return self._codes is not None

    def _quantize(self, vectors: FloatArray) -> None:
        rows, dim = vectors.shape
        codes = np.empty((rows, dim), dtype=np.int8)
        scale = np.empty(rows, dtype=np.float32)
        l1_term = np.empty(rows, dtype=np.float32)
        for start in range(0, rows, _CHUNK):
            part = vectors[start : start + _CHUNK].astype(np.float64)
            magnitude = np.abs(part)
            if not np.isfinite(magnitude).all() or magnitude.max(initial=0.0) > _HUGE:
                logger.warning("the item table holds NaN, inf or entries over 1e30: it is scanned in fp32")
                return
            row_max = magnitude.max(axis=1)
            l1 = magnitude.sum(axis=1)
            tiny = row_max < _TINY
            # The scale as stored (fp32); codes rounded against that very value, in float64.
            s = np.where(tiny, 0.0, row_max / 127.0).astype(np.float32)
            divisor = np.where(tiny, 1.0, s.astype(np.float64))
            here = slice(start, start + len(part))
            # A tiny row's entries (< _TINY) divided by 1 round to code 0.
            codes[here] = np.clip(np.rint(part / divisor[:, None]), -127, 127)
            scale[here] = s
            # ‖w‖₁/2, or, for a row too small to quantise (codes 0, scale 0), 127 ‖w‖₁: then
            # s_u * 127 ‖w‖₁ = max|u| ‖w‖₁ >= |u·w|. Rounded up so that fp32 never loses the bound.
            term = np.where(tiny, 127.0 * l1, l1 / 2)
            l1_term[here] = np.nextafter(term.astype(np.float32), np.float32(np.inf))
        self._codes = torch.from_numpy(codes).t()  # (D, N): _int_mm's right operand
        self._scale = torch.from_numpy(scale)
        self._l1_term = torch.from_numpy(l1_term)

    def top(self, query: FloatArray, n: int) -> tuple[IntArray, FloatArray]:
        """Positions and fp32 scores of the ``n`` best rows for ``query``, best first."""
        n = min(n, self.table.shape[0])
        if n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        # torch, on the calling thread's OpenMP thread: numpy's BLAS woke its own thread pool for
        # every query (0.6 ms a query).
        u = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
        # A shortlist as long as the table would re-score every row anyway: fp32 at once.
        found = self.bounds(u) if 2 * n + 64 < self.table.shape[0] else None
        if found is None:
            self.counts.fp32 += 1
        else:
            answer = self._certified(u, n, *found)
            self._judge(answer is not None)
            if answer is not None:
                return answer
        values, positions = block_topk(torch.mv(self.table, u), n)
        return positions.numpy().astype(np.int64, copy=False), values.numpy()

    def _judge(self, certified: bool) -> None:
        """Count one int8 scan; at the end of a window with too many fallbacks, give int8 up."""
        if certified:
            self.counts.certified += 1
        else:
            self.counts.fallback += 1
            self._fallbacks += 1
        self._attempts += 1
        if self._attempts == PROBATION:
            if self._fallbacks > MAX_FALLBACK_SHARE * PROBATION:
                logger.warning(
                    "int8 retrieval fell back to fp32 for %d of the last %d queries: fp32 only",
                    self._fallbacks,
                    PROBATION,
                )
                self._codes = None
            self._attempts = self._fallbacks = 0

    def bounds(self, u: torch.Tensor) -> tuple[float, torch.Tensor, float] | None:
        """``(s_u, bound, ‖u‖₁)`` with ``s_u * bound[r] >= u · row r`` for every row (module
        docstring; the fp32 arithmetic of the bound is covered for D <= QUANTIZE_MAX_DIM), or None
        when the table is not quantised, or ``u`` is zero, tiny or not finite."""
        codes = self._codes
        if codes is None:
            return None
        top = float(u.abs().max())
        u_l1 = float(u.abs().sum())
        if not (_TINY <= top < float("inf")) or not np.isfinite(u_l1):
            return None
        su = top / 127.0
        q = torch.clamp(torch.round(u.double() / su), -127, 127).to(torch.int8)[None, :]  # (1, D)
        products = torch._int_mm(q, codes)[0]  # (N,) int32: exact integer dot products
        dim = u.shape[0]
        # s_w (q·c_w + ‖u‖₁/(2 s_u) + ¼D) + ‖w‖₁/2, in two passes over per-row constants. The
        # ‖u‖₁ term is widened by (D + 16) 2⁻²³ · 254 of itself: more than the fp32 rounding of
        # these sums (each under D 2⁻²⁴ ‖u‖₁ max|w|, and max|w| = 127 s_w).
        widen = 1.0 + (dim + 16) * 2.0**-23 * 254
        alpha = u_l1 / (2 * su) * widen + 0.25 * dim
        bound = torch.add(self._l1_term, self._scale, alpha=alpha)
        bound.addcmul_(self._scale, products)
        return su, bound, u_l1

    def _certified(
        self, u: torch.Tensor, n: int, su: float, bound: torch.Tensor, u_l1: float
    ) -> tuple[IntArray, FloatArray] | None:
        """The shortlist's top n when the certificate holds (module docstring), else None."""
        dim = self.table.shape[1]
        highest, shortlist = block_topk(bound, 2 * n + 64)  # shorter than the table (see top)
        values, order = torch.topk(torch.mv(self.table[shortlist], u), n)  # fp32 re-score
        # Rows outside the shortlist score at most su * highest[-1]; the n-th re-scored value may
        # sit above its true score by its own fp32 rounding, at most D 2⁻²⁴ ‖u‖₁ max|w|.
        # (A tiny row has scale 0 and entries under _TINY.)
        max_w = max(127 * float(self._scale[shortlist].max()), _TINY)
        rounding = (dim + 16) * 2.0**-24 * u_l1 * max_w
        threshold = su * float(highest[-1])
        if not (math.isfinite(threshold) and float(values[-1]) - rounding >= threshold):
            return None
        return shortlist[order].numpy().astype(np.int64, copy=False), values.numpy()
