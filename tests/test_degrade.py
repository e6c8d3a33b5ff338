import numpy as np
import torch

from rtsr.features import SR
from rtsr.training.degrade import DegradationBank, codec_response, random_tilt, resampler_response


def _gain_db(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-item gain (dB) on the rfft grid from x to y."""
    return 20 * torch.log10(torch.fft.rfft(y.double()).abs() / torch.fft.rfft(x.double()).abs())


def test_degradations_keep_the_band_below_the_declared_cutoff_and_cut_above_it():
    """Random filters vary in family and order (a gentle 2nd-order Bessel is allowed), but each
    keeps its pass band, never amplifies beyond ripple, and attenuates above the cutoff."""
    bank = DegradationBank(9600, size=256, seed=0)
    f = torch.fft.rfftfreq(9600, 1 / SR)
    for resp, c in zip(bank.responses.float(), bank.cutoffs, strict=True):
        assert 1800 < c < 20500
        assert resp.max() < 1.03
        passband = resp[(f > 500) & (f < 0.5 * c)]
        assert passband.min() > 0.7
        above = resp[f > 1.5 * c] ** 2
        if len(above):
            assert above.mean() < 0.5 * (passband ** 2).mean()
    lr, cutoff = bank.degrade(torch.randn(4, 9600), torch.Generator().manual_seed(0))
    assert lr.shape == (4, 9600) and cutoff.shape == (4,)


def test_codec_and_resampler_shapes_are_in_the_bank():
    """The detector hands the model codec cliffs up to ~20 kHz and resamplers' sinc edges: training
    sees both, each declared at its edge."""
    f = np.fft.rfftfreq(9600, 1 / SR)
    rng = np.random.default_rng(0)
    codec = codec_response(f, 16000.0, rng)
    assert codec[f < 15900].min() == 1.0 and codec[f > 16900].max() < 10 ** (-69 / 20)
    sinc = resampler_response(f, 16000.0, rng)
    assert abs(sinc[f < 6000] - 1).max() < 0.01 and sinc[f > 9000].max() < 1e-3
    bank = DegradationBank(9600, size=512, seed=0)
    assert (bank.cutoffs > 16800).sum() > 10  # edges above the old 16 kHz ceiling


def test_high_share_gives_that_share_of_the_bank_to_edges_over_12_khz():
    usual = DegradationBank(9600, size=512, seed=0)
    high = DegradationBank(9600, size=512, seed=0, high_share=0.4)
    over = [(b.cutoffs >= 11500).float().mean().item() for b in (usual, high)]
    assert over[1] >= over[0] * 0.6 + 0.4 - 0.02  # the usual share of the rest, and 40 % more
    assert len(high.cutoffs) == 512 and (high.cutoffs[1:] >= high.cutoffs[:-1]).all()


def test_tilt_is_a_straight_line_in_octaves_above_the_pivot_and_leaves_below_alone():
    x = torch.randn(8, 4800, dtype=torch.float64)
    y = random_tilt(x, 4.0, torch.Generator().manual_seed(1), pivot_hz=1000.0)
    g = _gain_db(x, y)
    f = np.fft.rfftfreq(4800, 1 / SR)
    at = {hz: int(np.argmin(np.abs(f - hz))) for hz in (500, 1000, 2000, 4000, 16000)}
    assert g[:, at[500]].abs().max() < 1e-3
    per_octave = g[:, at[2000]]
    assert per_octave.abs().max() <= 4.0 + 1e-3 and per_octave.std() > 0.5  # random, within the bound
    torch.testing.assert_close(g[:, at[4000]], 2 * per_octave, atol=1e-3, rtol=0)
    torch.testing.assert_close(g[:, at[16000]], 4 * per_octave, atol=1e-3, rtol=0)


def test_no_tilt_is_the_identity():
    x = torch.randn(2, 4800)
    torch.testing.assert_close(random_tilt(x, 0.0), x, atol=1e-5, rtol=0)
