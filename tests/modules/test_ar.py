"""The ar objective: exact likelihood (no Monte Carlo), first token from the start token, documents."""

import math

import numpy as np
import pytest
import torch

from dlmtrain import build_module, load_config
from dlmtrain.config import config_from_resolved, to_yaml
from dlmtrain.data.synthetic import markov_log_prob
from dlmtrain.errors import ConfigError

P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
V = 7


from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


def real(*extra, seed=0):
    torch.manual_seed(seed)
    m = build_module(load_config(None, ["objective=ar", "model=tiny", f"model.vocab_size={V}", "optim.ema=0", *extra]))
    with torch.no_grad():  # the untied head starts at zero (uniform predictions): give it signal
        torch.nn.init.normal_(m.backbone.head.weight, std=0.5)
    return m.eval()


def test_oracle_nelbo_is_the_exact_log_likelihood(markov_ar):
    m = markov_ar(torch.tensor(P))
    x = torch.randint(0, 3, (5, 9), generator=torch.Generator().manual_seed(0))
    exact = -torch.tensor(markov_log_prob(x.numpy(), P))
    nats, t = m.nelbo_draws(x, num_samples=4)
    assert nats.shape == (5, 4) and torch.equal(t, torch.zeros(5, 4))
    assert torch.equal(nats, nats[:, :1].expand(-1, 4))  # no noise: every draw the same
    assert torch.allclose(nats[:, 0].double(), exact, rtol=0, atol=1e-9)
    assert m.scored_tokens(x).tolist() == [9] * 5  # every token, the first one included
    # padding: a row cut to length l scores exactly its prefix x[:l]
    lens = [9, 4, 1, 0, 6]
    am = torch.arange(9)[None, :] < torch.tensor(lens)[:, None]
    got = m.nelbo(x, am).double()
    want = [-markov_log_prob(x[i:i + 1, :n].numpy(), P)[0] if n else 0.0 for i, n in enumerate(lens)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    assert m.scored_tokens(x, am).tolist() == lens
    assert m.loss({"input_ids": x}).item() == pytest.approx(exact.sum().item() / 45, rel=1e-9)


def test_nelbo_is_the_sum_of_next_token_cross_entropies_by_hand():
    """Each term from its own pass over [start, x_0 .. x_{i-1}]: also checks nothing leaks from the future."""
    m = real()
    assert m.backbone.causal and m.start_id == V and m.backbone.embed.num_embeddings == V + 1 and m.backbone.out_dim == V
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        by_hand = torch.zeros(2, dtype=torch.float64)
        for i in range(10):
            inp = torch.cat([torch.full((2, 1), V), x[:, :i]], 1)
            logp = torch.log_softmax(m.backbone(inp)[:, -1].double(), -1)
            by_hand -= logp[torch.arange(2), x[:, i]]
        got = m.nelbo(x, num_samples=2)
    assert by_hand.min() > 10 * 0.5  # a model far from uniform: log 7 = 1.95 per token would be 19.5
    assert torch.allclose(got.double(), by_hand, rtol=1e-5)
    assert m.loss({"input_ids": x}).item() == pytest.approx(by_hand.sum().item() / 20, rel=1e-5)


def test_document_mask_scores_each_document_as_its_own_sequence():
    eos = 0
    x = torch.tensor([[3, 4, 5, eos, 6, 2, eos, 1, 4]])
    docs = [x[:, :4], x[:, 4:7], x[:, 7:]]
    m = real("model.document_mask=true", f"model.eos_id={eos}")
    with torch.no_grad():
        whole = m.nelbo(x).item()
        parts = sum(m.nelbo(d).item() for d in docs)
        plain = real().nelbo(x).item()  # the same weights without document masking
    assert whole == pytest.approx(parts, abs=1e-4)
    assert abs(plain - parts) > 0.1
    assert m.scored_tokens(x).item() == 9  # EOS tokens are scored: the model predicts where documents end


def test_config_makes_ar_causal_and_refusals():
    cfg = load_config(None, ["objective=ar", "model.causal=false", "model.vocab_size=5"])
    assert cfg.model.causal is True
    assert config_from_resolved(to_yaml(cfg)).model.causal is True
    assert load_config(None, ["model.vocab_size=5"]).model.causal is False  # mdlm untouched
    cfg.model.causal = False  # a hand-built config that slipped past load_config
    with pytest.raises(ConfigError, match="causal"):
        build_module(cfg)
    with pytest.raises(ConfigError, match="discrete_steps"):
        real().nelbo_draws(torch.zeros(1, 3, dtype=torch.long), discrete_steps=10)


def test_untrained_model_scores_log_v_per_token():
    """At init (zero head) every prediction is uniform over the V data ids: nelbo = L log V."""
    torch.manual_seed(0)
    m = build_module(load_config(None, ["objective=ar", "model=tiny", f"model.vocab_size={V}", "optim.ema=0"]))
    x = torch.randint(0, V, (3, 11))
    assert torch.allclose(m.nelbo(x), torch.full((3,), 11 * math.log(V)), rtol=1e-6)
