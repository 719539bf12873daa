"""The ELBO evaluation against sources whose bound is known exactly (oracle denoisers: oracles.py).

Tolerances are 4 standard errors of the quantity tested, computed by the code under test
where that is what is tested, so a wrong weight, a missed K or a mis-scaled SE fails.
"""

import math

import pytest
import torch
from oracles import (P, V, IIDOracle, MarkovOracle, exact_discrete_bound, exact_eps_bound, markov_module,
                     markov_nll, module_with, sample_markov, stationary)

from dlmtrain.data.tokenizer import ByteTokenizer, Tokenizer
from dlmtrain.diffusion.masked import discrete_weights
from dlmtrain.diffusion.schedules import draw_times, get_schedule
from dlmtrain.eval.bytes import ByteCounter
from dlmtrain.eval.elbo import LN2, ELBOAccumulator, evaluate


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(module, x, k, seed=0, steps=0, counter=None, t_bins=20, am=None):
    acc = ELBOAccumulator(t_bins, steps)
    batch = {"input_ids": x} if am is None else {"input_ids": x, "attention_mask": am}
    acc.add(module.elbo_batch(batch, gen(seed), k, steps), x, counter)
    return acc.summary()


def test_draw_times_stratify_each_row_and_the_batch():
    t = draw_times(6, 4, generator=gen(0))
    coarse = (t * 4).floor().long()
    assert all(sorted(r) == [0, 1, 2, 3] for r in coarse.tolist())  # each row's 4 draws cover [0, 1)
    assert sorted((t * 24).floor().long().flatten().tolist()) == list(range(24))  # each fine stratum once
    assert len(set(coarse[:, 0].tolist())) > 1  # draw 0 is not pinned to [0, 1/4)
    col = draw_times(4000, 4, generator=gen(1))[:, 0]
    assert col.mean().item() == pytest.approx(0.5, abs=0.014)  # marginally U[0,1): SD of the mean 0.0046
    iid = draw_times(3, 5, antithetic=False, generator=gen(2))
    assert iid.shape == (3, 5) and ((iid >= 0) & (iid < 1)).all()


def test_nelbo_is_the_mean_of_the_draws():
    m = markov_module()
    x = sample_markov(5, 6, gen(0))
    nats, t = m.nelbo_draws(x, num_samples=3, generator=gen(1))
    assert nats.shape == t.shape == (5, 3)
    assert torch.allclose(m.nelbo(x, num_samples=3, generator=gen(1)), nats.mean(1))


def test_estimate_within_its_se_of_the_exact_expectation_and_se_shrinks_like_sqrt_k():
    # eps = 0.1 so the one-shot decoding below eps carries real weight (and is not exact for a
    # Markov source); the expectation, enumerated over all 2^8 masks, includes it. A large eps
    # also tames the estimator's 1/t tail (variance ~ log(1/eps)), whose sample variance
    # otherwise scatters: at eps = 1e-3 the ratio below ranged 1.2..2.5 over 8 seeds.
    m = markov_module("objective.eps=0.1")
    x = sample_markov(1024, 8, gen(1))
    exact = exact_eps_bound(x, MarkovOracle(P, V), V, 0.1).sum().item() / x.numel()
    assert exact > markov_nll(x).sum().item() / x.numel() + 1e-3  # a bound, visibly looser than -log p(x)
    se = {}
    for k in (4, 16):
        s = run(m, x, k, seed=k)
        assert abs(s["nelbo"] - exact) < 4 * s["nelbo_se_mc"], (k, s["nelbo"], exact, s["nelbo_se_mc"])
        se[k] = s["nelbo_se_mc"]
    # sqrt(sum s_i^2 / K): 4x the draws, half the SE (over 8 seeds: 1.94 .. 2.09)
    assert 1.8 < se[4] / se[16] < 2.2


def test_default_estimator_agrees_with_log_likelihood():
    m = markov_module()  # eps = 1e-3: the bound is -log p(x) up to ~1e-6 nats
    x = sample_markov(512, 8, gen(3))
    truth = markov_nll(x).sum().item() / x.numel()
    s = run(m, x, 4, seed=5)
    assert abs(s["nelbo"] - truth) < 4 * s["nelbo_se_mc"] < 0.1 * truth  # resolves a weight off by 10%
    assert s["bpt"] == pytest.approx(s["nelbo"] / LN2) and s["ppl_bound"] == pytest.approx(math.exp(s["nelbo"]))


def test_standard_errors_match_their_formulas_with_padding_and_cover_the_population():
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    logp = torch.full((V + 1,), float("-inf"), dtype=torch.float64)
    logp[:V], logp[V] = pi.log(), 0.0
    m = module_with(IIDOracle(logp), V)
    n, L, k = 400, 16, 3
    x = torch.multinomial(pi, n * L, replacement=True, generator=gen(0)).view(n, L)
    lens = torch.randint(0, L + 1, (n,), generator=gen(1))  # some rows all padding
    am = torch.arange(L) < lens[:, None]
    out = m.elbo_batch({"input_ids": x, "attention_mask": am}, gen(2), k)
    acc = ELBOAccumulator(5)
    acc.add(out, x)
    s = acc.summary()
    rows = lens > 0
    y, nt = out["nats"][rows].double(), lens[rows].double()
    ybar, N, T = y.mean(1), rows.sum().item(), nt.sum().item()
    assert s["sequences"] == N < n and s["tokens"] == T
    R = ybar.sum().item() / T
    direct = math.sqrt(N / (N - 1) * ((ybar - R * nt) ** 2).sum().item()) / T  # ratio estimator, delta method
    assert s["nelbo"] == pytest.approx(R, rel=1e-12)
    assert s["nelbo_se"] == pytest.approx(direct, rel=1e-9)
    assert s["nelbo_se_mc"] == pytest.approx(math.sqrt((y.var(1) / k).sum().item()) / T, rel=1e-9)
    # the total SE covers data sampling: the population value is the entropy per token
    H = -(pi * pi.log()).sum().item()
    assert abs(s["nelbo"] - H) < 4 * s["nelbo_se"] < 0.15 * H


def test_t_bins_add_up_to_the_nelbo_and_the_iid_integrand_is_flat():
    # i.i.d. source, alpha = 1 - t: a token is masked w.p. t and weighted 1/t, so the per-token
    # integrand is the entropy H at every t
    pi = torch.tensor([0.6, 0.25, 0.15], dtype=torch.float64)
    logp = torch.full((V + 1,), float("-inf"), dtype=torch.float64)
    logp[:V] = pi.log()
    m = module_with(IIDOracle(logp), V)
    x = torch.multinomial(pi, 1024 * 16, replacement=True, generator=gen(0)).view(1024, 16)
    s = run(m, x, 8, seed=1, t_bins=8)
    b = s["t_bins"]
    assert sum(b["contribution"]) == pytest.approx(s["nelbo"], rel=1e-12)
    assert sum(b["share"]) == pytest.approx(1.0, rel=1e-12)
    assert b["draws"] == [1024] * 8  # 8 bins = the 8 coarse strata: one draw of every row in each
    truth = -torch.log(pi[x]).mean().item()  # the sample's own entropy per token
    for j, f in enumerate(b["integrand"]):
        # per-bin SD of the mean: ~1% of H (bin 0, t < 1/8, the noisiest: ~4%)
        assert f == pytest.approx(truth, rel=0.15 if j == 0 else 0.05), (j, f, truth)
        assert b["contribution"][j] == pytest.approx(f / 8, rel=1e-9)  # equal draws per bin: exact


def test_discrete_weights_closed_form():
    t = torch.tensor([0.1, 0.3, 0.6, 0.9, 0.0])
    ti, w = discrete_weights(t, 4, get_schedule("loglinear"))
    assert ti.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.25])
    assert w.tolist() == pytest.approx([4.0, 2.0, 4 / 3, 1.0, 4.0])  # T (a_{s} - a_t) / (1 - a_t) = T / i
    _, w = discrete_weights(torch.tensor([0.0, 0.5]), 100_000, get_schedule("cosine"))
    assert torch.isfinite(w).all() and w[0].item() == 100_000  # i = 1: reconstruction weight 1, times T


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_discrete_bound_decreases_in_T_to_log_likelihood(schedule):
    alpha = {"loglinear": lambda t: 1 - t, "cosine": lambda t: math.cos(math.pi * t / 2)}[schedule]
    o = MarkovOracle(P, V)
    x = sample_markov(256, 5, gen(2))
    truth = markov_nll(x).sum().item()
    exact = {T: exact_discrete_bound(x, o, V, T, alpha).sum().item() for T in (1, 2, 4, 16, 64, 256)}
    Ts = sorted(exact)
    assert all(exact[a] > exact[b] for a, b in zip(Ts, Ts[1:]))  # strictly decreasing in T
    assert exact[1] == pytest.approx(-torch.log(stationary(P)[x]).sum().item(), rel=1e-6)  # T = 1: marginals
    assert 0 < exact[256] - truth < 0.01 * truth  # -> -log p(x) from above ...
    assert 256 * (exact[256] - truth) == pytest.approx(64 * (exact[64] - truth), rel=0.1)  # ... like 1/T
    assert exact_eps_bound(x, o, V, 1e-12).sum().item() == pytest.approx(truth, rel=1e-6)  # T = inf is tight
    m = markov_module(f"objective.schedule={schedule}")
    est = {}
    for T in (1, 4, 16):
        s = run(m, x, 8, seed=3, steps=T)
        est[T] = s[f"nelbo_T{T}"]
        # the module's estimator is unbiased for the enumerated L_T (T = 1 has no randomness: SE 0)
        assert abs(est[T] - exact[T] / x.numel()) < 4 * s[f"nelbo_T{T}_se_mc"] + 1e-6, (T, est[T], exact[T] / x.numel())
    assert est[1] > est[4] > s["nelbo"] - 4 * s["nelbo_se_mc"]


class PairTokenizer(Tokenizer):
    """Two characters of 'acgt' per token (ids 0..15), [EOS] = 16: a second tokenizer of the same text."""

    kind = "pairs"
    A = "acgt"

    def __init__(self):
        self.vocab_size, self.specials = 17, {"eos": ("[EOS]", 16)}

    def decode(self, ids):
        return "".join("[EOS]" if i == 16 else self.A[i // 4] + self.A[i % 4] for i in ids)


def test_bits_per_byte_agree_across_tokenizers():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    chars = torch.multinomial(p, 512 * 32, replacement=True, generator=gen(0)).view(512, 32)
    truth_bits = -torch.log(p[chars]).sum().item() / LN2
    codes = torch.tensor([ord(c) for c in "acgt"])
    # bytes: one token per character; the model is the true i.i.d. law of characters
    btok = ByteTokenizer()
    lp = torch.full((btok.vocab_size + 1,), float("-inf"), dtype=torch.float64)
    lp[codes] = p.log()
    lp[-1] = 0.0
    xb = codes[chars]
    a = run(module_with(IIDOracle(lp), btok.vocab_size), xb, 8, seed=1, counter=ByteCounter(btok))
    # pairs: one token per two characters; the model is the law of pairs, p(c1) p(c2)
    ptok = PairTokenizer()
    lp2 = torch.full((18,), float("-inf"), dtype=torch.float64)
    lp2[:16] = (p.log()[:, None] + p.log()[None, :]).flatten()
    xp = chars[:, 0::2] * 4 + chars[:, 1::2]
    b = run(module_with(IIDOracle(lp2), 17), xp, 8, seed=2, counter=ByteCounter(ptok))
    assert ByteCounter(btok).table is not None and ByteCounter(ptok).table is None  # table and decode paths
    assert a["bytes"] == b["bytes"] == 512 * 32 and a["tokens"] == 2 * b["tokens"]
    for s in (a, b):
        assert abs(s["bpb"] - truth_bits / chars.numel()) < 4 * s["bpb_se_mc"] < 0.1 * truth_bits / chars.numel()
        assert s["bpb"] * s["bytes"] == pytest.approx(s["bpt"] * s["tokens"], rel=1e-12)
    assert abs(a["bpb"] - b["bpb"]) < 4 * math.hypot(a["bpb_se_mc"], b["bpb_se_mc"])
    assert b["bpt"] == pytest.approx(2 * b["bpb"], rel=1e-12)  # 2 bytes per token


def test_byte_counts_specials_padding_and_split_characters():
    tok = ByteTokenizer()
    ids = torch.tensor([list("héllo".encode()) + [tok.eos_id, 0]])  # 6 bytes, EOS, padding
    scored = torch.tensor([[True] * 7 + [False]])
    assert ByteCounter(tok)(ids, scored).tolist() == [6]  # EOS 0 bytes, padding unscored
    cut = torch.tensor([list("é".encode())[:1]])  # half a character at a sequence edge
    assert ByteCounter(tok)(cut, torch.ones_like(cut, dtype=torch.bool)).tolist() == [1]  # its byte, not U+FFFD's 3


def test_byte_table_of_byte_level_bpe_matches_decoded_text():
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    from dlmtrain.data.tokenizer import HFTokenizer

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["héllo wörld, naïve café 日本語のテキスト text"] * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["[PAD]", "[EOS]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer(hf, {"pad": ("[PAD]", 0), "eos": ("[EOS]", 1)})
    counter = ByteCounter(tok)
    assert counter.table is not None
    text = "naïve 日本語 wörld café, héllo text"
    ids = torch.tensor([tok.encode(text) + [tok.eos_id]])
    assert len(tok.encode(text)) < len(text.encode())  # merges happened: tokens are not bytes
    assert counter(ids, torch.ones_like(ids, dtype=torch.bool)).tolist() == [len(text.encode("utf-8"))]


def test_evaluate_on_batches_matches_accumulating_by_hand():
    m = markov_module("eval.nelbo_samples=3", "eval.t_bins=4", "trainer.seed=7")
    batches = [{"input_ids": sample_markov(8, 6, gen(i))} for i in range(3)]
    res = evaluate(m, batches, max_batches=2)
    from dlmtrain.eval.elbo import eval_generator

    acc = ELBOAccumulator(4)
    for i, b in enumerate(batches[:2]):
        acc.add(m.elbo_batch(b, eval_generator(7, 0, i, "cpu"), 3), b["input_ids"])
    ref = acc.summary()
    assert res["sequences"] == 16 and res["nelbo"] == ref["nelbo"] and res["nelbo_se_mc"] == ref["nelbo_se_mc"]
    assert "bpb" not in res and len(res["t_bins"]["contribution"]) == 4  # no tokenizer, no bytes


def test_eval_generator_takes_any_seed_and_keeps_the_draws_of_small_ones():
    from dlmtrain.eval.elbo import eval_generator

    big = [torch.rand(3, generator=eval_generator(12345, r, b, "cpu")) for r, b in [(0, 0), (0, 1), (1, 0)]]
    assert not torch.equal(big[0], big[1]) and not torch.equal(big[0], big[2])  # (seed, rank, batch) still apart
    ref = torch.Generator().manual_seed(((7 * 1_000_003 + 7919) * 65_537 + 0) * 1_048_576 + 2)
    assert torch.equal(torch.rand(3, generator=eval_generator(7, 0, 2, "cpu")), torch.rand(3, generator=ref))
