"""objective.masked_head: head + chunked cross-entropy only at masked positions gives the same
loss, NELBO and gradients (every parameter) as the full-logits path (masked_token_nll)."""

import pytest
import torch

from dlmtrain import build_module, load_config
from dlmtrain.backbone.chunked_ce import chunked_linear_nll

torch.set_num_threads(1)
V, EOS = 37, 3
# float32 rounding only: sums over ~100 tokens and 37-way softmaxes, differently ordered
RTOL, ATOL = 1e-5, 1e-6


def _pair(*extra):
    base = ["model=tiny", f"model.vocab_size={V}", "model.hidden_size=32", "model.n_layers=2", "model.n_heads=2",
            "model.cond_dim=16", *extra]
    torch.manual_seed(0)
    new = build_module(load_config(None, base + ["objective.masked_head=true", "objective.ce_chunk_size=7"]))
    old = build_module(load_config(None, base + ["objective.masked_head=false"]))
    old.load_state_dict(new.state_dict())
    with torch.no_grad():  # non-zero head and adaLN, so every parameter gets a gradient
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    old.load_state_dict(new.state_dict())
    return new, old


def _batch(prompt=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, V, (4, 24), generator=g)
    x[:, 9] = EOS
    x[1, 17] = EOS
    am = torch.ones_like(x, dtype=torch.bool)
    am[2, 15:] = False
    am[3, 5:] = False
    b = {"input_ids": x, "attention_mask": am}
    if prompt:
        pm = torch.zeros_like(am)
        pm[:, :6] = True
        b["prompt_mask"] = pm
    return b


@pytest.mark.parametrize("extra,prompt", [
    ([], False),
    (["objective.time_conditioning=true"], False),
    (["objective.time_conditioning=true"], True),
    (["model.document_mask=true", f"model.eos_id={EOS}"], False),
    (["objective.time_conditioning=true", "model.tie_weights=true", "model.head_bias=true"], True),
])
def test_masked_head_loss_grads_and_nelbo_equal_full_path(extra, prompt):
    new, old = _pair(*extra)
    batch = _batch(prompt)
    ln, lo = new.loss(batch), old.loss(batch)
    ln.backward()
    lo.backward()
    assert ln.item() > 1.0  # something was scored
    torch.testing.assert_close(ln, lo, rtol=RTOL, atol=ATOL)
    go = dict(old.named_parameters())
    for name, p in new.named_parameters():
        assert p.grad is not None and go[name].grad is not None, name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, go[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    kw = {"prompt_mask": batch["prompt_mask"]} if prompt else {}
    with torch.no_grad():
        nn_, _ = new.nelbo_draws(batch["input_ids"], batch["attention_mask"], 3, torch.Generator().manual_seed(2), **kw)
        no, _ = old.nelbo_draws(batch["input_ids"], batch["attention_mask"], 3, torch.Generator().manual_seed(2), **kw)
        dn, _ = new.nelbo_draws(batch["input_ids"], batch["attention_mask"], 2, torch.Generator().manual_seed(3),
                                discrete_steps=8, **kw)
        do, _ = old.nelbo_draws(batch["input_ids"], batch["attention_mask"], 2, torch.Generator().manual_seed(3),
                                discrete_steps=8, **kw)
    torch.testing.assert_close(nn_, no, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(dn, do, rtol=RTOL, atol=1e-5)
    assert nn_[0].sum() > 0 and nn_.shape == (4, 3)


@pytest.mark.parametrize("chunk", [0, 1, 5, 64])
def test_chunked_linear_nll_matches_cross_entropy_in_float64(chunk):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (13,), generator=g)
    t[t == 4] = 5
    scale = torch.rand(13, generator=g, dtype=torch.float64)
    got = chunked_linear_nll(h, w, b, t, exclude=4, chunk_size=chunk)
    logits = h @ w.t() + b
    logits = logits.masked_fill(torch.arange(11) == 4, float("-inf"))
    ref = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)  # float32 output
    gr = torch.autograd.grad((got.double() * scale).sum(), (h, w, b))
    rr = torch.autograd.grad((ref * scale).sum(), (h, w, b))
    for a, r in zip(gr, rr):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert gr[1][4].abs().max() == 0 and gr[2][4] == 0  # the excluded column gets no gradient


@pytest.mark.parametrize("extra", [[], ["model.document_mask=true", f"model.eos_id={EOS}"]])
def test_validation_elbo_batch_equal_full_path_under_inference_mode(extra):
    # The path validation_step takes: elbo_batch under inference_mode (no autograd), padding, explicit
    # segment_ids (two documents per row, used under document masking), continuous and T-step draws.
    new, old = _pair("objective.time_conditioning=true", *extra)
    batch = _batch()
    batch["segment_ids"] = (torch.arange(24) >= 10).long().expand(4, 24).clone()
    heads = []
    new.backbone.head.register_forward_hook(lambda m, a, out: heads.append(a[0].shape[:-1].numel()))
    with torch.inference_mode():
        a = new.elbo_batch(batch, torch.Generator().manual_seed(6), 4, discrete_steps=16)
        b = old.elbo_batch(batch, torch.Generator().manual_seed(6), 4, discrete_steps=16)
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["scored"], b["scored"])
    torch.testing.assert_close(a["nats"], b["nats"], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(a["nats_T"], b["nats_T"], rtol=RTOL, atol=1e-5)
    assert (a["nats"].sum(1) > 0).all() and a["nats"].shape == a["nats_T"].shape == (4, 4)
    # the head saw only masked positions: fewer rows than the 8 full passes of 4 x 24 would
    assert len(heads) == 8 and 0 < sum(heads) < 8 * int(a["scored"].sum())
