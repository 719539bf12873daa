"""Block diffusion samplers (dlmtrain/sampling/block.py): against the exact block conditionals of a
Markov chain (chi-square on bigrams at significance 1e-3, fixed seeds), KV cache = no cache, EOS stop."""

import pytest
import torch
from torch import nn

from block_oracles import BlockMarkovOracle
from chain_oracles import K, chi2_pvalue, exact_pair
from dlmtrain import build_module, load_config
from dlmtrain.errors import ConfigError
from dlmtrain.sampling import sample

ALPHA = 1e-3


def bd3lm(block_size, vocab=K, *extra):
    cfg = load_config(None, ["objective=bd3lm", "model=tiny", f"model.vocab_size={vocab}",
                             f"objective.block_size={block_size}", "optim.ema=0", *extra])
    return build_module(cfg)


def oracle_bd3lm(block_size, *extra):
    m = bd3lm(block_size, K, *extra)
    m.backbone = BlockMarkovOracle()
    return m


def pair_counts(ids, i, j):
    return torch.bincount(ids[:, i] * K + ids[:, j], minlength=K * K).view(K, K)


SAMPLERS = [("ancestral", 64), ("first_hitting", 1), ("confidence", 3)]  # steps per block (block of 3)


@pytest.mark.parametrize("sampler,steps", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_block_samplers_reproduce_the_chain_given_a_prompt(sampler, steps):
    """L = 8 in blocks {0,1,2} {3,4,5} {6,7}, prompt x_0 = 2: bigrams inside blocks and across
    block boundaries follow p(x | x_0 = 2); the prompt is unchanged and seen by the first block."""
    oracle = BlockMarkovOracle()
    m = oracle_bd3lm(3)
    m.backbone = oracle
    res = sample(m, 3000, 8, steps, sampler=sampler, prompt_ids=[2], seed=1)
    assert (res.ids[:, 0] == 2).all() and res.ids.max() < K
    for i, j in [(1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (1, 7)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(8, i, j, {0: 2}))
        assert p > ALPHA, (i, j, p)
    # cached: one commit pass per finished block (0..2 with the prompt, 3..5), first_hitting one
    # evaluation per free token
    if sampler == "first_hitting":
        assert res.nfe == 7 + 2 == oracle.calls


def test_a_sequence_longer_than_any_training_length_follows_the_chain_far_out():
    res = sample(oracle_bd3lm(4), 2000, 44, 1, sampler="first_hitting", seed=2)
    for i, j in [(39, 40), (41, 42)]:  # positions past 32, across and inside a block
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(8, 3, 4))  # stationary: any (i, i+1)
        assert p > ALPHA, (i, j, p)


def test_the_bigram_test_rejects_one_step_per_block():
    # one ancestral step reveals a whole block at once, each token from its marginal
    res = sample(oracle_bd3lm(3), 3000, 8, 1, sampler="ancestral", seed=1)
    assert chi2_pvalue(pair_counts(res.ids, 3, 4), exact_pair(8, 3, 4)) < 1e-6
    assert chi2_pvalue(pair_counts(res.ids, 2, 3), exact_pair(8, 2, 3)) > ALPHA  # across blocks: still exact


def real_model(*extra, seed=0):
    torch.manual_seed(seed)
    m = bd3lm(4, 11, "model.hidden_size=32", "model.n_heads=2", "model.n_layers=2", "model.cond_dim=16", *extra)
    with torch.no_grad():
        torch.nn.init.normal_(m.backbone.head.weight, std=0.3)
        for p in m.backbone.parameters():  # time conditioning: modulation that matters
            if p.dim() == 2 and p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.1)
    return m.eval()


@pytest.mark.parametrize("sampler,steps,extra", [
    ("ancestral", 6, []), ("first_hitting", 1, []), ("confidence", 2, []),
    ("ancestral", 6, ["objective.time_conditioning=true"]),
], ids=["ancestral", "first_hitting", "confidence", "ancestral-time"])
def test_kv_cached_sampler_returns_the_tokens_of_the_uncached_one(sampler, steps, extra):
    """A real backbone; L = 21 (blocks of 4, the last one short), a prompt of 6 ending inside a block."""
    m = real_model(*extra)
    kw = dict(sampler=sampler, prompt_ids=[1, 2, 3, 4, 5, 6], seed=3)
    on = sample(m, 5, 21, steps, cache=True, **kw)
    off = sample(m, 5, 21, steps, cache=False, **kw)
    assert torch.equal(on.ids, off.ids)
    assert len(set(on.ids[:, 6:].flatten().tolist())) > 5  # not degenerate
    # blocks 0..3 (given), 4..7, ..., 20: one commit pass before each of the 5 denoised blocks;
    # cache=False also turns off ancestral's reuse of unchanged outputs (not used with time conditioning)
    if sampler == "ancestral" and not extra:
        assert on.nfe < off.nfe + 5
    else:
        assert on.nfe == off.nfe + 5
    if sampler == "first_hitting":
        assert off.nfe == 15  # one evaluation per free token


class EOSOracle(nn.Module):
    """Every position: EOS (id 3) with probability 0.2, else one of 0..2."""

    def __init__(self):
        super().__init__()
        self.logp = torch.log(torch.tensor([0.3, 0.3, 0.2, 0.2]))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, **kw):
        out = torch.full((*z.shape, 5), 3.0)  # [MASK] = 4
        out[..., :4] = self.logp
        return out


def test_stop_at_eos_ends_rows_after_their_first_drawn_eos_and_stops_early():
    m = bd3lm(4, 4, "model.eos_id=3")
    m.backbone = EOSOracle()
    prompt = [3, 1]  # an EOS in the prompt does not count
    full = sample(m, 6, 64, 1, sampler="first_hitting", prompt_ids=prompt, seed=4)
    res = sample(m, 6, 64, 1, sampler="first_hitting", prompt_ids=prompt, seed=4, stop_at_eos=True)
    ids = res.ids
    assert (ids[:, :2] == torch.tensor(prompt)).all()
    first = [int((row[2:] == 3).nonzero()[0]) + 2 for row in ids]
    for row, f, ref in zip(ids, first, full.ids):
        assert (row[f:] == 3).all()  # EOS from the first drawn one on
        assert torch.equal(row[:f + 1], ref[:f + 1])  # the same draws up to it
    last_block = max(first) // 4
    assert res.nfe == (last_block + 1) * 4 - 2 + last_block  # one per free token up to that block + commits
    assert res.nfe < full.nfe


def test_conditioning_that_a_block_sampler_cannot_honour_is_refused():
    m = oracle_bd3lm(3)
    with pytest.raises(ConfigError, match="later blocks"):
        sample(m, 2, 8, 4, suffix_ids=[1])
    with pytest.raises(ConfigError, match="later blocks"):
        sample(m, 2, 8, 4, fixed={0: 1, 3: 2})  # position 3 is in the block after the first free one
    sample(m, 2, 8, 4, fixed={0: 1, 2: 2})  # inside the first free block: fine
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample(m, 2, 8, 4, prompt_ids=[1], cfg_scale=1.0)
    with pytest.raises(ConfigError, match="eos_id"):
        sample(m, 2, 8, 4, stop_at_eos=True)
    mdlm = build_module(load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0"]))
    with pytest.raises(ConfigError, match="stop_at_eos"):
        sample(mdlm, 2, 8, 4, stop_at_eos=True)
