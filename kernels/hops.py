"""The output side of many streams' hops in one call each: frames queued, frames overlap-added.

Rows (one per channel of a stream) hold the analysed frames that wait for their hop (spectrum,
log-mel and band of each, `queued` of them from the stream's next output frame on) and the
overlap-add tail: the partial sums of the HOP samples after the last finished one. With HOP =
N_FFT / 2 frame t covers [(t - 1) HOP, (t + 1) HOP), so a hop of n frames from frame `pos` adds into
(n + 1) HOP samples starting at (pos - 1) HOP, of which the first n HOP are then final.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def enqueue(rows: np.ndarray, counts: np.ndarray, at: np.ndarray, channels: int, band_now: np.ndarray,
            spec: np.ndarray, mel: np.ndarray, q_spec: np.ndarray, q_mel: np.ndarray, q_band: np.ndarray,
            queued: np.ndarray) -> None:
    """Stream s (rows rows[s] .. + channels) queues counts[s] new frames: spec[at[s] + c * counts[s]
    + j] is channel c's frame j ((frames, bins) and (frames, mels) packed stream by stream), each of
    band band_now[s]."""
    for s in range(len(rows)):
        n = counts[s]
        for c in range(channels):
            r = rows[s] + c
            q = queued[r]
            src = at[s] + c * n
            for j in range(n):
                q_spec[r, q + j] = spec[src + j]
                q_mel[r, :, q + j] = mel[src + j]
                q_band[r, q + j] = band_now[s]
            queued[r] = q + n


@numba.njit(cache=True, nogil=True)
def hop_inputs(rows: np.ndarray, q_mel: np.ndarray, q_band: np.ndarray, lookahead: int,
               n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hop's model inputs from the queues of these rows: the log-mel `lookahead` frames ahead
    (conditioning) and of the hop's own n frames (the low band kept), and the frames' bands:
    (rows, mels, n) twice and (rows, n), what numpy's fancy indexing gives, four times faster."""
    g, mels = len(rows), q_mel.shape[1]
    cond = np.empty((g, mels, n), np.float32)
    low = np.empty((g, mels, n), np.float32)
    band = np.empty((g, n), q_band.dtype)
    for i in range(g):
        r = rows[i]
        for m in range(mels):
            for t in range(n):
                cond[i, m, t] = q_mel[r, m, lookahead + t]
                low[i, m, t] = q_mel[r, m, t]
        for t in range(n):
            band[i, t] = q_band[r, t]
    return cond, low, band


@numba.njit(cache=True, nogil=True)
def overlap_add_hop(rows: np.ndarray, frames: np.ndarray, window: np.ndarray, hop: int, first: np.ndarray,
                    end: np.ndarray, tail: np.ndarray, q_spec: np.ndarray, q_mel: np.ndarray, q_band: np.ndarray,
                    queued: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row rows[i] overlap-adds its hop's frames[i] ((n, n_fft) synthesis frames, the window applied
    here) onto its tail and drops the hop's n frames from its queue. Of the n HOP samples made final,
    those at or past `first[i]` (relative: the stream's samples before its first are not output)
    and before `end[i]` (relative: the end of a flushed stream) come out: (rows, n HOP) with the
    count per row. Each HOP of samples is written once, as the sum of the two frames over it (the
    tail or the earlier frame first, as adding them one by one would), and the frames left in the
    queue move to its front element by element: twice as fast as adding into a zeroed buffer and
    moving them with slice copies."""
    g, n, n_fft = frames.shape
    out = np.zeros((g, n * hop), np.float32)
    made = np.zeros(g, np.int64)
    buf = np.empty((n + 1) * hop, np.float32)
    for i in range(g):
        r = rows[i]
        for j in range(hop):
            buf[j] = tail[r, j] + frames[i, 0, j] * window[j]
        for k in range(1, n):
            for j in range(hop):
                buf[k * hop + j] = frames[i, k - 1, hop + j] * window[hop + j] + frames[i, k, j] * window[j]
        for j in range(hop):
            buf[n * hop + j] = frames[i, n - 1, hop + j] * window[hop + j]
        lo, hi = max(first[i], 0), min(end[i], n * hop)
        if hi > lo:
            out[i, :hi - lo] = buf[lo:hi]
            made[i] = hi - lo
        tail[r] = buf[n * hop:]
        q = queued[r]
        for j in range(q - n):
            for b in range(q_spec.shape[2]):
                q_spec[r, j, b] = q_spec[r, n + j, b]
            for m in range(q_mel.shape[1]):
                q_mel[r, m, j] = q_mel[r, m, n + j]
            q_band[r, j] = q_band[r, n + j]
        queued[r] = q - n
    return out, made


def merged_spectra(rows: np.ndarray, q_spec: np.ndarray, band: np.ndarray, band_weights: np.ndarray,
                   gen: np.ndarray) -> np.ndarray:
    """The low-band merge of a hop, in one pass: w x the queued input spectrum + (1 - w) x the
    model's (gen: (rows, n, bins)), w the input's weight per bin from each frame's band (band:
    (rows, n) indices into band_weights). The arithmetic of `rtsr.engine.merge_low_band` (the
    compiled loop may fuse a multiply and an add: a last-bit difference, the same for every row
    and batch), on the spectra's real and imaginary parts as float32 pairs, which vectorises:
    twice as fast as complex cells."""
    pairs = _merged_pairs(rows, q_spec.view(np.float32), band, band_weights,
                          np.ascontiguousarray(gen).view(np.float32))
    return pairs.view(np.complex64)


@numba.njit(cache=True, nogil=True)
def _merged_pairs(rows: np.ndarray, q_spec: np.ndarray, band: np.ndarray, band_weights: np.ndarray,
                  gen: np.ndarray) -> np.ndarray:
    g, n, pairs = gen.shape
    out = np.empty((g, n, pairs), np.float32)
    for i in range(g):
        for t in range(n):
            w = band_weights[band[i, t]]
            lr, model, o = q_spec[rows[i], t], gen[i, t], out[i, t]
            for k in range(pairs // 2):
                a, b = w[k], 1 - w[k]
                o[2 * k] = a * lr[2 * k] + b * model[2 * k]
                o[2 * k + 1] = a * lr[2 * k + 1] + b * model[2 * k + 1]
    return out


@numba.njit(cache=True, nogil=True)
def match_levels(rows: np.ndarray, matched: np.ndarray, q_spec: np.ndarray, band: np.ndarray, edge_bin: np.ndarray,
                 taper: np.ndarray, gen: np.ndarray, ring: np.ndarray, count: np.ndarray, span: int,
                 max_gain: float) -> np.ndarray:
    """Raise the model's band to the input's level at the edge, in place, for rows with matched[i]:
    frame t's model spectrum gen[i, t] (bins from its band's edge bin on; bands with edge_bin -1
    are left) times g ** taper[band, k], g = sqrt(the input's power in the `span` bins under the
    edge / the model's in the span bins from it), each power summed over the frame and the ring's
    LEVEL_FRAMES - 1 before it (oldest first, so a frame's g is the same for any hop lengths),
    g clipped to [1, max_gain]. Returns each frame's two powers (rows, n, 2) for `remember_levels`."""
    g, n, bins = gen.shape
    m = ring.shape[1]
    powers = np.zeros((g, n, 2))
    for i in range(g):
        if not matched[i]:
            continue
        r = rows[i]
        c = count[r]
        for t in range(n):
            e = edge_bin[band[i, t]]
            if e < 0:
                continue
            p_in, p_gen = 0.0, 0.0
            for k in range(max(e - span, 0), e):
                x = q_spec[r, t, k]
                p_in += np.float64(x.real) ** 2 + np.float64(x.imag) ** 2
            for k in range(e, min(e + span, bins)):
                x = gen[i, t, k]
                p_gen += np.float64(x.real) ** 2 + np.float64(x.imag) ** 2
            powers[i, t, 0], powers[i, t, 1] = p_in, p_gen
            s_in, s_gen = 0.0, 0.0
            for f in range(max(c + t - m + 1, 0), c + t + 1):  # absolute frames, oldest first
                if f < c:
                    s_in += ring[r, f % m, 0]
                    s_gen += ring[r, f % m, 1]
                else:
                    s_in += powers[i, f - c, 0]
                    s_gen += powers[i, f - c, 1]
            gain = np.sqrt(s_in / s_gen) if s_gen > 0 else 1.0
            log_gain = np.log(min(max(gain, 1.0), max_gain))
            if log_gain > 0:
                b = band[i, t]
                for k in range(e, bins):
                    if taper[b, k] > 0:
                        gen[i, t, k] *= np.float32(np.exp(log_gain * taper[b, k]))
    return powers


@numba.njit(cache=True, nogil=True)
def remember_levels(rows: np.ndarray, matched: np.ndarray, powers: np.ndarray, ring: np.ndarray,
                    count: np.ndarray) -> None:
    """The hop's frame powers (from `match_levels`) into the rows' rings, once the hop is done."""
    m = ring.shape[1]
    for i in range(len(rows)):
        if not matched[i]:
            continue
        r = rows[i]
        for t in range(powers.shape[1]):
            ring[r, (count[r] + t) % m] = powers[i, t]
        count[r] += powers.shape[1]
