"""The ELBO evaluation: per-sequence NELBO draws -> nats/token, perplexity bound, bits per
token and per byte, with standard errors, and where in t the bound is spent.

Inputs per sequence i (a row with n_i > 0 scored tokens; rows without are padding and
ignored): K draws Y_ik of the objective's NELBO estimator (nats, ``nelbo_draws``), their
times t_ik, n_i and b_i (UTF-8 bytes of its scored text, dlmtrain/eval/bytes.py). With
N sequences, T = sum n_i tokens, B = sum b_i bytes, Ybar_i the mean of row i's draws:

    nelbo = sum_i Ybar_i / T        (nats/token)      bpt = nelbo / ln 2
    bpb   = sum_i Ybar_i / (B ln 2) (bits/byte)       ppl_bound = exp(nelbo)
    so bpb * B = bpt * T exactly.

Two standard errors, for two questions:

- ``*_se_mc`` (Monte Carlo noise only; K >= 2): how far the number could move with other
  random times and masks on *this* validation set, which is what two checkpoints
  evaluated on the same set differ by. Given the data, Var(sum_i Ybar_i) = sum_i s_i^2 / K
  with s_i^2 the sample variance of row i's draws, so  se_mc = sqrt(sum_i s_i^2 / K) / T
  (/ (B ln 2) for bpb). The draws of a row are stratified in t (``draw_times``), which
  lowers the true variance of Ybar_i; s_i^2 / K ignores that, so se_mc is conservative.
- ``*_se`` (data sampling and noise together; N >= 2): how far it could move on another
  validation set of the same size. Sequences as i.i.d. draws from the data, the
  ratio estimator's delta-method error
      se = sqrt( N/(N-1) * sum_i (Ybar_i - nelbo * n_i)^2 ) / T
  (bpb: residuals Ybar_i - bpb ln2 * b_i, over B ln 2). Ybar_i carries its own noise, so
  this includes the Monte Carlo part; it needs only K >= 1. Rows within a batch share a
  stratified set of times, which makes it slightly conservative too.
  ``ppl_bound_se`` = ppl_bound * nelbo_se (delta method).

Both rest on sample variances, and the masked-diffusion draws are heavy-tailed (weight
~1/t: tail index 2, variance growing like log(1/eps)), so with few draws an SE can itself
be off by tens of percent (tests/eval: at eps = 1e-3, 1024 x 4 draws, the SE varied 1.2x to
2.5x between seeds); trust it with thousands of draws.

Where the bound is spent: [0, 1] cut into ``t_bins`` equal bins; bin j gets the draws
with t in it. ``contribution_j`` = sum_{draws in j} Y_ik / K / T (nats/token): the bins'
contributions add up to ``nelbo`` exactly. ``integrand_j`` = sum Y_ik / sum n_i over those
draws: the per-token integrand averaged over the bin (nats/token per unit t), so that
contribution_j ~ integrand_j * width up to how many draws fell in the bin. ``share_j`` =
contribution_j / nelbo.

Every sum lives in one float64 tensor of fixed size, so ranks combine it with one
all-reduce (sum) before ``summary``.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
# per-sequence sums; *_T: the same for the discrete-time bound
FIELDS = ("sequences", "tokens", "bytes", "nats", "var_mc", "mc_rows", "nats_sq", "nats_tokens", "tokens_sq",
          "nats_bytes", "bytes_sq", "nats_T", "var_mc_T", "nats_T_sq", "nats_T_tokens")
_F = {name: i for i, name in enumerate(FIELDS)}


def eval_generator(seed: int, rank: int, batch_idx: int, device) -> torch.Generator:
    """The evaluation's randomness for one batch: a function of (seed, rank, batch index) only,
    so every validation draws the same times and masks, whatever the DataLoader workers."""
    g = torch.Generator(device=device)
    # modulo 2^64 (manual_seed's range): seeds >= ~270 overflowed; smaller ones keep their draws
    g.manual_seed((((seed * 1_000_003 + 7919) * 65_537 + rank) * 1_048_576 + batch_idx) % 2**64)
    return g


class ELBOAccumulator:
    """Sums for :func:`summary`. ``sums`` is a float64 vector of ``len(FIELDS) + 3 t_bins``
    entries (the per-bin sums of Y/K, of n/K and of draws): all-reduce it across ranks."""

    def __init__(self, t_bins: int = 20, discrete_steps: int = 0, device=None):
        self.t_bins, self.discrete_steps = t_bins, discrete_steps
        self.sums = torch.zeros(len(FIELDS) + 3 * t_bins, dtype=torch.float64, device=device)

    def update(self, nats, t, tokens, bytes=None, nats_T=None) -> None:
        """One batch: ``nats``/``t`` [B, K] draws and times, ``tokens`` [B] scored tokens,
        ``bytes`` [B] (optional), ``nats_T`` [B, K'] draws of the discrete-time bound (optional).
        No host synchronisation: rows without tokens are weighted out, not indexed out."""
        y = nats.double()
        k = y.shape[1]
        n = tokens.double()
        r = (n > 0).double()
        ybar = y.mean(1)
        s = torch.zeros(len(FIELDS), dtype=torch.float64, device=y.device)
        s[_F["sequences"]] = r.sum()
        s[_F["tokens"]] = n.sum()
        s[_F["nats"]] = (r * ybar).sum()
        if k >= 2:
            s[_F["var_mc"]] = (r * y.var(1) / k).sum()
            s[_F["mc_rows"]] = r.sum()
        s[_F["nats_sq"]] = (r * ybar * ybar).sum()
        s[_F["nats_tokens"]] = (ybar * n).sum()
        s[_F["tokens_sq"]] = (n * n).sum()
        if bytes is not None:
            b = bytes.double()
            s[_F["bytes"]] = (r * b).sum()
            s[_F["nats_bytes"]] = (r * ybar * b).sum()
            s[_F["bytes_sq"]] = (r * b * b).sum()
        if nats_T is not None:
            d = nats_T.double()
            dbar = d.mean(1)
            s[_F["nats_T"]] = (r * dbar).sum()
            if d.shape[1] >= 2:
                s[_F["var_mc_T"]] = (r * d.var(1) / d.shape[1]).sum()
            s[_F["nats_T_sq"]] = (r * dbar * dbar).sum()
            s[_F["nats_T_tokens"]] = (dbar * n).sum()
        nb = self.t_bins
        idx = (t.double() * nb).floor().clamp(0, nb - 1).long().flatten()
        bins = torch.zeros(3, nb, dtype=torch.float64, device=y.device)
        bins[0].index_add_(0, idx, (r[:, None] * y / k).flatten())
        bins[1].index_add_(0, idx, (r[:, None] * n[:, None] / k).expand_as(y).flatten())  # /k like Y: their ratio is per token
        bins[2].index_add_(0, idx, r[:, None].expand_as(y).flatten())
        self.sums += torch.cat([s, bins.flatten()])

    def add(self, out: dict, input_ids: torch.Tensor, byte_counter=None) -> None:
        """A batch as the module's ``elbo_batch`` returns it (``nats``, ``t``, ``scored``, ``nats_T``)."""
        scored = out["scored"]
        b = byte_counter(input_ids, scored) if byte_counter is not None else None
        self.update(out["nats"], out["t"], scored.sum(-1), b, out.get("nats_T"))

    def summary(self, sums: torch.Tensor | None = None) -> dict:
        return summary(self.sums if sums is None else sums, self.t_bins, self.discrete_steps)


def _ratio(num: float, den: float, n: float, sq: float, cross: float, den_sq: float):
    """(num/den, delta-method SE across rows): residuals y_i - R x_i, sum of squares expanded."""
    r = num / den
    if n < 2:
        return r, math.nan
    ss = max(sq - 2 * r * cross + r * r * den_sq, 0.0)
    return r, math.sqrt(n / (n - 1) * ss) / den


def summary(sums: torch.Tensor, t_bins: int, discrete_steps: int = 0) -> dict:
    """The metrics from (all-reduced) sums; standard errors that are undefined (K < 2 for
    *_se_mc, N < 2 for *_se, no bytes for bpb) are left out. See the module docstring."""
    v = sums.detach().double().cpu().tolist()
    f = {name: v[i] for i, name in enumerate(FIELDS)}
    n, tok, nbytes = f["sequences"], f["tokens"], f["bytes"]
    out: dict = {"sequences": n, "tokens": tok, "bytes": nbytes}
    if tok <= 0:
        return out
    mc = f["mc_rows"] == n  # every row had K >= 2 draws
    nelbo, se = _ratio(f["nats"], tok, n, f["nats_sq"], f["nats_tokens"], f["tokens_sq"])
    ppl = math.exp(min(nelbo, 50.0))
    out.update(nelbo=nelbo, nelbo_se=se, nelbo_se_mc=math.sqrt(f["var_mc"]) / tok if mc else math.nan,
               ppl_bound=ppl, ppl_bound_se=ppl * se, bpt=nelbo / LN2, bpt_se=se / LN2)
    out["bpt_se_mc"] = out["nelbo_se_mc"] / LN2
    if nbytes > 0:
        bpn, bse = _ratio(f["nats"], nbytes, n, f["nats_sq"], f["nats_bytes"], f["bytes_sq"])
        out.update(bpb=bpn / LN2, bpb_se=bse / LN2,
                   bpb_se_mc=math.sqrt(f["var_mc"]) / nbytes / LN2 if mc else math.nan)
    if discrete_steps > 0:
        key = f"nelbo_T{discrete_steps}"
        d, dse = _ratio(f["nats_T"], tok, n, f["nats_T_sq"], f["nats_T_tokens"], f["tokens_sq"])
        out.update({key: d, f"{key}_se": dse, f"{key}_se_mc": math.sqrt(f["var_mc_T"]) / tok if mc else math.nan})
    b = v[len(FIELDS):]
    ynum, ntok, draws = b[:t_bins], b[t_bins:2 * t_bins], b[2 * t_bins:]
    contrib = [y / tok for y in ynum]
    out["t_bins"] = {
        "t_lo": [j / t_bins for j in range(t_bins)],
        "t_hi": [(j + 1) / t_bins for j in range(t_bins)],
        "t_mid": [(j + 0.5) / t_bins for j in range(t_bins)],
        "integrand": [y / m if m > 0 else math.nan for y, m in zip(ynum, ntok)],
        "contribution": contrib,
        "share": [c / nelbo if nelbo else math.nan for c in contrib],
        "draws": draws,
    }
    return {k: val for k, val in out.items() if not (isinstance(val, float) and math.isnan(val))}


def scalars(result: dict) -> dict:
    """The loggable numbers of a summary (everything but the t-bins)."""
    return {k: v for k, v in result.items() if not isinstance(v, dict)}


def evaluate(module, data, *, num_samples: int | None = None, seed: int | None = None, tokenizer=None,
             t_bins: int | None = None, discrete_steps: int | None = None, max_batches: int | None = None,
             progress: bool = False) -> dict:
    """The validation's ELBO evaluation without a Trainer (for `dlmtrain eval`), one process.

    ``data``: a DataModule (its ``val_dataloader()`` and ``tokenizer`` are used) or any
    iterable of batches (dicts with ``input_ids`` and optionally ``attention_mask``,
    ``segment_ids``, ``prompt_mask``: then the bound and the bytes are the answers'). Defaults come from ``module.cfg`` (eval.nelbo_samples, eval.t_bins,
    eval.discrete_steps, trainer.seed), so with the same weights and batches the numbers
    equal validation's on rank 0. Uses the EMA weights when the module holds an EMA (a
    checkpoint loaded with ``dlmtrain.load_checkpoint`` already has them in place). Runs
    in the module's dtype without autocast. Returns :func:`summary`'s dict (bpb only when
    a tokenizer is given or the DataModule has one).
    """
    from dlmtrain.eval.bytes import ByteCounter

    e = module.cfg.eval
    num_samples = e.nelbo_samples if num_samples is None else num_samples
    t_bins = e.t_bins if t_bins is None else t_bins
    discrete_steps = e.discrete_steps if discrete_steps is None else discrete_steps
    seed = module.cfg.trainer.seed if seed is None else seed
    tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
    batches = data.val_dataloader() if hasattr(data, "val_dataloader") else data
    counter = ByteCounter(tokenizer) if tokenizer is not None else None
    device = next(module.parameters()).device
    acc = ELBOAccumulator(t_bins, discrete_steps, device=device)
    if progress:
        from tqdm import tqdm

        total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
        batches = tqdm(batches, total=total, desc="nelbo", unit="batch")
    ema = getattr(module, "ema", None)
    swap = ema is not None and not ema.active
    was_training = module.training
    module.eval()
    try:
        if swap:
            ema.swap_in(module.backbone)
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                out = module.elbo_batch(batch, eval_generator(seed, 0, i, device), num_samples, discrete_steps)
                acc.add(out, batch["input_ids"], counter)
    finally:
        if swap and ema.active:
            ema.swap_out(module.backbone)
        module.train(was_training)
    res = acc.summary()
    if not getattr(module, "has_time", True):  # e.g. ar: every draw at t = 0, the t-bins say nothing
        res.pop("t_bins", None)
    return res
