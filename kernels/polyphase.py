"""Polyphase FIR resampling kernel (numba) plus a tiny numpy reference of the same formula.

For a prototype low-pass ``h`` of odd length K designed at the upsampled rate ``up * sr_in`` and
``D = (K - 1) // 2``, output sample m (at time m / sr_out) is

    y[m] = up * sum_i x[i] * h[m * down + D - i * up],   x[i] = 0 outside the given buffer.

Centering the filter at D makes the output zero-lag. Only one polyphase branch of ``h`` meets the
input samples, so each output costs about K / up multiply-adds instead of K.
"""

import numba
import numpy as np


def polyphase_bank(h: np.ndarray, up: int) -> np.ndarray:
    """Rearrange ``h`` into (up, ceil(K / up)) float32 rows, one per branch, reversed and zero-padded.

    Row p holds h[p], h[p + up], ... from last to first, so an output becomes one contiguous dot
    product with the inputs in time order, which the compiler can vectorise.
    """
    taps = -(-len(h) // up)
    padded = np.zeros(taps * up)
    padded[: len(h)] = h
    return np.ascontiguousarray(padded.reshape(taps, up).T[:, ::-1], dtype=np.float32)


# Few phases (up <= VERTICAL_MAX_UP: 8, 16, 24, 32 kHz to 48 kHz) give each phase many outputs, which
# are summed side by side: lanes across outputs, taps in order within each, so no reassociation is
# needed to vectorise and an output's bits never depend on its neighbours; float32 sums (1.7x faster than
# float64; rounding ~1e-6 of full scale, 30 dB under the filter's stopband). Many phases (44.1 kHz)
# leave a phase a handful of outputs per block; there each output is one dot product over its taps,
# also in float32 (26 -> 15 us per 20 ms of 44.1 kHz input against float64).
VERTICAL_MAX_UP = 8
# With one stride class (down == 1: 8, 16, 24 kHz and 12 kHz in) an output's taps are added this many
# at a time in one pass over the outputs, which keeps the running sums in registers: 8.7 -> 5.9 us per
# 20 ms of 16 kHz input, the same bits (each output still sums its taps in order).
TAP_BLOCK = 16


@numba.njit(cache=True, nogil=True)
def _resample_outputs_side_by_side(bank, up, down, d, x, x0, m0, m1, y):
    taps = bank.shape[1]
    lo = (m0 * down + d) // up - taps + 1  # the first input any output touches
    hi = ((m1 - 1) * down + d) // up
    width = (hi - lo) // down + taps + 2
    xs = np.zeros((down, width), np.float32)  # xs[s, i] = x[lo + s + i * down]: each stride class contiguous
    first, end = max(lo, x0), min(hi, x0 + len(x) - 1) + 1
    if down == 1:  # one class: a copy (the general loop's two divisions per input cost ~0.9 us per 20 ms at 16 kHz)
        xs[0, first - lo:end - lo] = x[first - x0:end - x0]
    else:
        for i in range(first, end):
            rel = i - lo
            xs[rel % down, rel // down] = x[i - x0]
    n_out = m1 - m0
    acc = np.empty((n_out + up - 1) // up, np.float32)
    for r in range(min(up, n_out)):
        t = (m0 + r) * down + d
        b = bank[t % up]
        start = t // up - taps + 1 - lo
        nq = (n_out - r + up - 1) // up  # outputs m0 + r, m0 + r + up, ... share this phase
        acc[:nq] = 0.0
        k = 0
        if down == 1:  # every input in one row: TAP_BLOCK taps per pass over the outputs, still in order
            while k + TAP_BLOCK <= taps:
                bk, src = b[k:k + TAP_BLOCK], xs[0, start + k:start + k + nq + TAP_BLOCK]
                for q in range(nq):
                    v = acc[q]
                    for kk in range(TAP_BLOCK):
                        v += bk[kk] * src[q + kk]
                    acc[q] = v
                k += TAP_BLOCK
        for tap in range(k, taps):
            j = start + tap
            src = xs[j % down, j // down:j // down + nq]
            for q in range(nq):
                acc[q] += b[tap] * src[q]
        for q in range(nq):
            y[r + q * up] = up * acc[q]


# reassoc lets LLVM vectorise the dot products. The summation order then depends only on the trip
# count, which the streaming caller keeps equal to the whole-signal one, so results stay bit-exact.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _resample_outputs_one_by_one(bank, up, down, d, x, x0, m0, m1, y):
    taps = bank.shape[1]
    for m in range(m0, m1):
        t = m * down + d
        i_hi = t // up  # newest input with a tap on it
        i_lo = i_hi - taps + 1
        a = max(i_lo, x0)  # first buffered input in the row's span
        count = max(min(i_hi, x0 + len(x) - 1) - a + 1, 0)
        row = bank[t - i_hi * up, a - i_lo:a - i_lo + count]
        xc = x[a - x0:a - x0 + count]
        s = np.float32(0.0)
        for k in range(row.shape[0]):
            s += row[k] * xc[k]
        y[m - m0] = up * s


@numba.njit(cache=True, nogil=True)
def ready_end(n_in: int, m_next: int, up: int, down: int, d: int) -> int:
    """The end of the outputs whose inputs have all arrived: output m needs inputs up to
    (m*down + d) // up, i.e. m*down + d < n_in*up."""
    return max(m_next, -(-(n_in * up - d) // down))


@numba.njit(cache=True, nogil=True)
def oldest_needed(m_next: int, up: int, down: int, d: int, taps: int) -> int:
    """The first input that output m_next or a later one touches. The whole bank row span counts
    (not just its nonzero taps): the kernel's summation order follows the span length, and it must
    match the whole-signal run."""
    return (m_next * down + d) // up - taps + 1


@numba.njit(cache=True, nogil=True)
def resample_row(bank: np.ndarray, up: int, down: int, d: int, x: np.ndarray, x0: int, m0: int, m1: int,
                 y: np.ndarray) -> None:
    """Outputs [m0, m1) of one channel into y[:m1 - m0] (float32), for ``bank = polyphase_bank(h, up)``,
    d = (len(h) - 1) // 2; ``x`` (1-D) holds the inputs from absolute index x0 on. Inputs outside the
    buffer count as zero, which is exact before the signal start and after its end; the caller must
    keep every other input an output's row spans (from (m*down + d) // up - bank.shape[1] + 1) buffered."""
    if m1 <= m0:
        return
    if up <= VERTICAL_MAX_UP:
        _resample_outputs_side_by_side(bank, up, down, d, x, x0, m0, m1, y)
    else:
        _resample_outputs_one_by_one(bank, up, down, d, x, x0, m0, m1, y)


@numba.njit(cache=True, nogil=True)
def polyphase_resample(
    bank: np.ndarray, up: int, down: int, d: int, x: np.ndarray, x0: int, m0: int, m1: int
) -> np.ndarray:
    """`resample_row` for every channel of ``x`` (frames, channels): outputs (m1 - m0, channels)."""
    y = np.empty((max(m1 - m0, 0), x.shape[1]), dtype=np.float32)
    out = np.empty(max(m1 - m0, 0), dtype=np.float32)
    for c in range(x.shape[1]):
        resample_row(bank, up, down, d, np.ascontiguousarray(x[:, c]), x0, m0, m1, out)
        y[:, c] = out
    return y


def polyphase_resample_ref(
    h: np.ndarray, up: int, down: int, x: np.ndarray, x0: int, m0: int, m1: int
) -> np.ndarray:
    """Direct evaluation of the module formula from ``h`` itself: slow but obviously right."""
    k = np.arange(m0, m1)[:, None] * down + (len(h) - 1) // 2 - np.arange(x0, x0 + len(x))[None, :] * up
    taps = np.where((k >= 0) & (k < len(h)), np.asarray(h, np.float64)[np.clip(k, 0, len(h) - 1)], 0.0)
    return (up * taps @ np.asarray(x, np.float64)).astype(np.float32)
