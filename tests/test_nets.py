"""The networks' two evaluations agree: whole sequences (conv1d, training) and streaming calls
(gathered taps with carried caches); remembered FiLM modulations equal computed ones
and follow changed weights."""

import torch

from rtsr.models.nets import Denoiser, Vocoder, init_cache


def _chunks(total: int, gen: torch.Generator) -> list[int]:
    """Live-sized calls (1..8 frames, gathered taps) mixed with offline-sized ones (conv1d)."""
    sizes = []
    while sum(sizes) < total:
        n = int(torch.randint(1, 9, (), generator=gen)) if torch.rand((), generator=gen) < 0.8 else 40
        sizes.append(min(n, total - sum(sizes)))
    return sizes


@torch.no_grad()
def test_streaming_calls_equal_the_whole_sequence():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    den, voc = Denoiser(32, 3, emb_dim=16).eval(), Vocoder(32, 2).eval()
    x, cond = torch.randn(2, 80, 150), torch.randn(2, 80, 150)
    mask, t = (torch.rand(2, 80) < 0.4).float(), torch.tensor([1.0, 0.5])
    whole_den, whole_voc = den(x, cond, mask, t), voc(cond)
    dc, vc = init_cache(den, 2), init_cache(voc, 2)
    parts_den, parts_voc, a = [], [], 0
    for n in _chunks(150, gen):
        parts_den.append(den(x[..., a:a + n], cond[..., a:a + n], mask, t, dc))
        parts_voc.append(voc(cond[..., a:a + n], vc))
        a += n
    torch.testing.assert_close(torch.cat(parts_den, -1), whole_den, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts_voc, 1), whole_voc, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_remembered_film_equals_the_computed_one_and_follows_weight_changes():
    """The sampler's FiLM of a float time (`step_film`) gives the output of the times as a tensor;
    it is remembered, and a weight change replaces it without writing into the one handed out
    (a tensor kept across CUDA-graph replays must never change under its holder)."""
    torch.manual_seed(0)
    den = Denoiser(32, 2, emb_dim=16).eval()
    x, cond, mask = torch.randn(3, 80, 5), torch.randn(3, 80, 5), (torch.rand(3, 80) < 0.5).float()
    film = den.step_film(0.5)
    assert film.shape == (2, 2, 32) and den.step_film(0.5) is film  # served from memory
    torch.testing.assert_close(den(x, cond, mask, None, film=film), den(x, cond, mask, torch.full((3,), 0.5)),
                               atol=1e-6, rtol=1e-6)
    kept = film.clone()
    den.blocks[1].film.weight.add_(0.5)
    changed = den.step_film(0.5)
    assert changed is not film and not torch.allclose(changed, kept)
    torch.testing.assert_close(film, kept, atol=0, rtol=0)  # the old one untouched
    torch.testing.assert_close(den(x, cond, mask, None, film=changed), den(x, cond, mask, torch.full((3,), 0.5)),
                               atol=1e-6, rtol=1e-6)
