"""optim.fused: torch's fused AdamW gives the foreach update to float rounding, and gradient clipping
works with it under bf16-mixed (Lightning's AMP plugin alone would refuse)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dlmtrain import build_module, load_config
from dlmtrain.errors import ConfigError

torch.set_num_threads(1)
BASE = ["model=tiny", "model.vocab_size=29", "model.hidden_size=32", "model.n_layers=2", "model.n_heads=2",
        "model.cond_dim=16", "objective.time_conditioning=true", "optim.ema=0", "optim.warmup_steps=0",
        "optim.weight_decay=0.1", "optim.lr=1e-2"]


def _pair(*extra):
    torch.manual_seed(0)
    fused = build_module(load_config(None, BASE + ["optim.fused=true", *extra]))
    plain = build_module(load_config(None, BASE + ["optim.fused=false", *extra]))
    with torch.no_grad():  # a non-zero head, so every parameter gets a gradient
        fused.backbone.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _batches(n):
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 29, (4, 16), generator=g)} for _ in range(n)]


def test_fused_steps_equal_foreach_steps():
    fused, plain = _pair()
    of, op = fused.configure_optimizers()["optimizer"], plain.configure_optimizers()["optimizer"]
    assert of.defaults["fused"] and not op.defaults["fused"] and op.defaults["foreach"]
    before = {n: p.detach().clone() for n, p in fused.named_parameters()}
    for batch in _batches(3):  # the same gradients into both, three steps (moments and bias correction)
        for m, opt in ((fused, of), (plain, op)):
            opt.zero_grad()
            m._gen = None
            m.loss(batch).backward()
        for a, b in zip(fused.parameters(), plain.parameters()):
            b.grad.copy_(a.grad)
        of.step()
        op.step()
    pp = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert (p - before[name]).abs().max() > 1e-3, name  # lr 1e-2: every parameter moved
        torch.testing.assert_close(p, pp[name], rtol=1e-6, atol=1e-7, msg=name)


class _Norms(L.Callback):
    """The global gradient norm the optimizer step used (after Lightning's clipping, which runs in the
    closure inside optimizer.step: read after the step, before the next zero_grad)."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, pl_module):
        def post(opt, *_):
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(post)


def _fit(module, clip):
    cb = _Norms()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[cb])
    trainer.fit(module, train_dataloaders=DataLoader(_batches(3), batch_size=None))
    return cb.norms


def test_fused_trains_with_clipping_under_bf16_mixed_like_foreach():
    fused, plain = _pair()
    nf, np_ = _fit(fused, 1e-3), _fit(plain, 1e-3)
    assert len(nf) == len(np_) == 3
    assert all(n <= 1e-3 * (1 + 1e-4) for n in nf + np_)  # clipped (unclipped norms are ~1)
    pp = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, pp[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra", [["trainer.precision=16-mixed"], ["strategy=deepspeed_zero2"]])
def test_fused_refuses_what_it_cannot_do(extra):
    with pytest.raises(ConfigError, match="optim.fused"):
        load_config(None, BASE + ["optim.fused=true", *extra])
