"""Block diffusion (BD3-LM): the attention mask, block times, and the block bound against a
Markov source whose conditionals are known exactly (tests/block_oracles.py)."""

import math
from itertools import product

import pytest
import torch

from block_oracles import BlockMarkovOracle
from chain_oracles import K, chain_nll, one_thread, sample_chain  # noqa: F401
from dlmtrain import build_module, load_config
from dlmtrain.diffusion.block import (
    attention_mask, block_causal_mask, block_draw_times, block_times, mask_mod, num_blocks, per_position,
)
from dlmtrain.diffusion.schedules import draw_times


def test_attention_mask_for_L8_block2_by_hand():
    # rows: queries [x_t 0..7 ; x0 0..7], columns: keys in the same order; blocks {0,1} {2,3} {4,5} {6,7}
    rows = [
        "11000000 00000000", "11000000 00000000",
        "00110000 11000000", "00110000 11000000",
        "00001100 11110000", "00001100 11110000",
        "00000011 11111100", "00000011 11111100",
        "00000000 11000000", "00000000 11000000",
        "00000000 11110000", "00000000 11110000",
        "00000000 11111100", "00000000 11111100",
        "00000000 11111111", "00000000 11111111",
    ]
    expect = torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])
    assert torch.equal(attention_mask(8, 2), expect)


@pytest.mark.parametrize("L,bs", [(8, 2), (7, 3), (5, 5), (6, 1), (4, 9)])
def test_mask_mod_block_causal_mask_and_block_index_agree_with_the_mask(L, bs):
    m = attention_mask(L, bs)
    i = torch.arange(2 * L)
    assert torch.equal(mask_mod(L, bs)(0, 0, i[:, None], i[None, :]), m)  # the flex form, same mask
    assert torch.equal(block_causal_mask(0, L, bs), m[L:, L:])  # the clean copy = the sampler's cache
    last = (num_blocks(L, bs) - 1) * bs
    # the last block noisy over a clean prefix (uncached sampler): itself and every block before
    got = block_causal_mask(last, L, bs)
    assert torch.equal(got[:, last:], m[last:L, last:L]) and torch.equal(got[:, :last], m[last:L, L:L + last])


def test_block_times_are_stratified_over_batch_and_blocks_and_split_over_ranks():
    g = torch.Generator().manual_seed(0)
    t = block_times(6, 4, generator=g)
    strata = (t.flatten() * 24).floor().long().sort().values
    assert t.shape == (6, 4) and torch.equal(strata, torch.arange(24))  # one time per stratum of 24
    # two ranks with 3 rows each use disjoint halves of the same 24 strata
    a = block_times(3, 4, offset=0, total=6, generator=g)
    b = block_times(3, 4, offset=3, total=6, generator=g)
    both = (torch.cat([a, b]).flatten() * 24).floor().long().sort().values
    assert torch.equal(both, torch.arange(24))
    c = block_times(50, 3, lo=0.3, hi=0.8, generator=g)
    assert c.min() >= 0.3 and c.max() < 0.8
    # one block: exactly the MDLM draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(block_draw_times(7, 1, 3, generator=g1)[:, 0], draw_times(7, 3, generator=g2))
    assert torch.equal(per_position(torch.tensor([[1, 2, 3]]), 7, 3), torch.tensor([[1, 1, 1, 2, 2, 2, 3]]))


def bd3lm(block_size, *extra, vocab=K):
    cfg = load_config(None, ["objective=bd3lm", "model=tiny", f"model.vocab_size={vocab}",
                             f"objective.block_size={block_size}", "optim.ema=0", *extra])
    return build_module(cfg)


def oracle_bd3lm(block_size, *extra):
    m = bd3lm(block_size, *extra)
    m.backbone = BlockMarkovOracle()
    return m


def exact_block_bound(x, block_size, eps):
    """E[L_BD] per row, by enumeration: for every block b and mask pattern M of it,
    c_b(M) = sum_{i in M} -log p(x^i | x^{<b}, the block's other tokens), weighted by
    int_eps^1 (1/t) q(M | t) dt + q(M | eps) for alpha = 1 - t (masked.py's estimator)."""
    oracle = BlockMarkovOracle()
    n, L = x.shape
    total = torch.zeros(n, dtype=torch.float64)
    for start in range(0, L, block_size):
        size = min(block_size, L - start)
        for pat in product([False, True], repeat=size):
            k = sum(pat)
            if k == 0:
                continue
            z = x.clone()
            z[:, start:start + size] = torch.where(torch.tensor(pat), K, x[:, start:start + size])
            z[:, start + size:] = K  # later blocks: not visible
            logp = torch.log_softmax(oracle(z).double()[..., :K], -1).gather(-1, x[..., None]).squeeze(-1)
            cost = -(logp[:, start:start + size] * torch.tensor(pat)).sum(1)
            integral = sum(math.comb(size - k, j) * (-1) ** j * (1 - eps ** (k + j)) / (k + j) for j in range(size - k + 1))
            total += cost * (integral + eps ** k * (1 - eps) ** (size - k))
    return total


@pytest.mark.parametrize("block_size", [2, 3, 6])
def test_nelbo_of_the_true_block_conditionals_equals_log_likelihood(block_size):
    g = torch.Generator().manual_seed(0)
    x = sample_chain(3, 6, g)
    truth = chain_nll(x)
    # the bound's expectation, enumerated: tight up to the eps reconstruction (two tokens decoded
    # together at eps = 1e-3: O(eps^2))
    exact = exact_block_bound(x, block_size, 1e-3)
    assert (exact - truth).abs().max() < 1e-4, (exact, truth)
    # the module's estimator (mask-reading oracle): unbiased within 4 SE per sequence, pooled
    # precise enough that a weight 3% off would fail
    reps = 20000
    est = oracle_bd3lm(block_size).nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(3, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    se_sum = se.pow(2).sum().sqrt()
    assert (mean.sum() - truth.sum()).abs() < 4 * se_sum < 0.03 * truth.sum()


def test_block_size_one_is_the_exact_autoregressive_likelihood():
    g = torch.Generator().manual_seed(1)
    x = sample_chain(5, 9, g)
    m = oracle_bd3lm(1)
    nats, t = m.nelbo_draws(x, num_samples=3, generator=g)
    assert torch.allclose(nats.double(), chain_nll(x)[:, None].expand(-1, 3), rtol=1e-6)  # no noise
    # in training too: the loss is the per-token AR NLL
    assert m.loss({"input_ids": x}).item() == pytest.approx(chain_nll(x).sum().item() / x.numel(), rel=1e-6)


def test_padding_and_prompt_are_neither_masked_nor_scored():
    g = torch.Generator().manual_seed(2)
    x = sample_chain(4, 8, g)
    am = torch.ones(4, 8, dtype=torch.bool)
    am[1, 5:] = False
    pm = torch.zeros(4, 8, dtype=torch.bool)
    pm[:, :3] = True
    m = oracle_bd3lm(1)  # exact: -log p(x_3..x_n | x_0..x_2)
    got = m.nelbo(x, am, prompt_mask=pm)
    keep = am & ~pm
    lp = torch.log(torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64))
    step = lp[x[:, :-1], x[:, 1:]]  # -log p(x_i | x_{i-1}) for i >= 1
    expect = -(step * keep[:, 1:]).sum(1)
    assert torch.allclose(got.double(), expect, rtol=1e-6)
    assert m.scored_mask(x, am, prompt_mask=pm).sum(1).tolist() == [5, 2, 5, 5]
    x2 = x.clone()
    x2[1, 5:] = (x2[1, 5:] + 1) % K  # padding content changes nothing
    assert torch.allclose(m.nelbo(x2, am, prompt_mask=pm), got)


def test_one_block_equals_mdlm_with_the_same_draws():
    g = torch.Generator().manual_seed(3)
    x = sample_chain(6, 8, g)
    # oracles: the same conditionals, read through the block mask or given z directly
    mdlm = build_module(load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0"]))
    mdlm.backbone = BlockMarkovOracle()
    a = oracle_bd3lm(8).nelbo_draws(x, num_samples=3, generator=torch.Generator().manual_seed(4))[0]
    b = mdlm.nelbo_draws(x, num_samples=3, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b)
    # a real backbone, the same weights: equal to float rounding
    torch.manual_seed(0)
    blk = bd3lm(8, "model.hidden_size=32", "model.n_heads=2", vocab=11)
    with torch.no_grad():
        torch.nn.init.normal_(blk.backbone.head.weight, std=0.5)
    mdlm = build_module(load_config(None, ["model=tiny", "model.vocab_size=11", "model.hidden_size=32",
                                           "model.n_heads=2", "optim.ema=0"]))
    mdlm.backbone.load_state_dict(blk.backbone.state_dict())
    y = torch.randint(0, 11, (4, 8), generator=g)
    with torch.no_grad():
        a = blk.nelbo_draws(y, num_samples=2, generator=torch.Generator().manual_seed(6))[0]
        b = mdlm.nelbo_draws(y, num_samples=2, generator=torch.Generator().manual_seed(6))[0]
    assert (a > 1).sum() >= 4 and torch.allclose(a, b, rtol=1e-5)
