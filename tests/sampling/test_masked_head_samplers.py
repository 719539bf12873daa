"""objective.masked_head in the samplers: the output head runs only at the positions a sampler
draws or ranks, and the samples are the same tokens as with full logits (same seed)."""

import pytest
import torch

from dlmtrain import build_module, load_config
from dlmtrain.sampling import sample

V, EOS, N, L = 37, 3, 4, 16


def _pair(*extra):
    base = ["model=tiny", f"model.vocab_size={V}", "model.hidden_size=32", "model.n_layers=2", "model.n_heads=2",
            "model.cond_dim=16", "optim.ema=0", *extra]
    new = build_module(load_config(None, base + ["objective.masked_head=true"]))
    old = build_module(load_config(None, base + ["objective.masked_head=false"]))
    with torch.no_grad():  # a non-trivial head and adaLN: distributions far from uniform
        for p in new.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    old.load_state_dict(new.state_dict())
    return new, old


def _rows_through_head(module):
    rows = []
    module.backbone.head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    return rows


CASES = [
    ([], dict(sampler="ancestral", steps=20, cache=True)),
    ([], dict(sampler="ancestral", steps=20, cache=False, top_p=0.9)),
    (["objective.time_conditioning=true"], dict(sampler="ancestral", steps=12, temperature=0.7)),
    ([], dict(sampler="first_hitting", steps=1, fixed={5: 7, 11: 9})),
    (["objective.time_conditioning=true"], dict(sampler="first_hitting", steps=1, float64=False)),
    ([], dict(sampler="confidence", steps=6, confidence="margin", top_k=5)),
    (["objective.time_conditioning=true"], dict(sampler="confidence", steps=5, prompt_ids=[4, 5, 6], cfg_scale=1.5)),
    ([], dict(sampler="semi_ar", steps=8, block_len=5, inner="confidence", suffix_ids=[8, 9])),
    ([], dict(sampler="semi_ar", steps=16, block_len=4, inner="ancestral", prompt_ids=[4, 5])),
    (["model.document_mask=true", f"model.eos_id={EOS}"], dict(sampler="confidence", steps=7, fixed={6: EOS})),
]


@pytest.mark.parametrize("extra,kw", CASES)
def test_masked_head_samples_equal_full_logits(extra, kw):
    new, old = _pair(*extra)
    rows_new, rows_old = _rows_through_head(new), _rows_through_head(old)
    a = sample(new, N, L, seed=3, **kw)
    b = sample(old, N, L, seed=3, **kw)
    assert torch.equal(a.ids, b.ids)
    assert a.nfe == b.nfe == len(rows_new) == len(rows_old)
    assert rows_old == [N * L] * b.nfe  # the full path: every position through the head
    free = N * L - N * sum(len(kw.get(k, ())) for k in ("prompt_ids", "suffix_ids", "fixed"))
    if kw["sampler"] in ("ancestral", "first_hitting") or kw.get("inner") == "ancestral":
        # each free position goes through the head once: in the evaluation that reveals it
        assert sum(rows_new) == free
    else:  # confidence: every still-masked position of every round (x2 with guidance)
        assert free < sum(rows_new) < sum(rows_old)
    assert (a.ids != new.mask_id).all() and a.ids.unique().numel() > 5  # finished, and not one token


def test_denoise_at_positions_equals_the_full_output_indexed():
    new, old = _pair("objective.time_conditioning=true")
    g = torch.Generator().manual_seed(5)
    z = torch.randint(0, V, (3, L), generator=g)
    z[torch.rand(3, L, generator=g) < 0.6] = new.mask_id
    at = (z == new.mask_id) & (torch.rand(3, L, generator=g) < 0.7)
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        full = old.denoise(z, t)
        part = new.denoise(z, t, at=at)
        fallback = old.denoise(z, t, at=at)
    assert part.shape == (int(at.sum()), V + 1) and torch.equal(fallback, full[at])
    torch.testing.assert_close(part, full[at], rtol=1e-6, atol=1e-6)
    assert torch.isinf(part[:, new.mask_id]).all() and torch.isfinite(part[:, :V]).all()
