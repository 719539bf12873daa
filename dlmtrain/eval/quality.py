"""Sample quality: diversity statistics of generated token sequences and generative perplexity.

Generative perplexity alone rewards degenerate, repetitive text (a loop of one word has a
very low perplexity), so it is always reported beside the samples' unigram entropy and
their n-gram diversity.

Definitions (ids are the sampler's token ids, before any retokenization):
- ``entropy``: per sample, the entropy in nats of its unigram distribution
  (-sum_v c_v/n log c_v/n over the sample's n tokens), averaged over samples
  (peers' "entropy"; ~ log(n) for text with no repeated tokens).
- ``distinct_n``: unique n-grams / all n-grams, pooled over all samples (Li et al., 2016).
- ``rep_n``: per sample, 1 - unique n-grams / n-grams (the share of repeated n-grams,
  Welleck et al., 2019), averaged over samples.
- ``gen_ppl``: exp(total NLL / total scored tokens) of the decoded texts under an
  evaluation LM that retokenizes them with its own tokenizer, every token scored: a Hugging
  Face causal LM (EvalLM: each text is preceded by the LM's BOS, or EOS, token) or a
  dlmtrain ``ar`` checkpoint (CheckpointLM: its start token). :func:`load_eval_lm` picks.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def _ngrams(seq: list[int], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def unigram_entropy(seq: list[int]) -> float:
    if not seq:
        return 0.0
    n = len(seq)
    return -sum(c / n * math.log(c / n) for c in Counter(seq).values())


def diversity(samples: list[list[int]], max_n: int = 4) -> dict[str, float]:
    """entropy, distinct_1..max_n, rep_1..max_n of token-id sequences (see module docstring)."""
    out = {"entropy": sum(unigram_entropy(s) for s in samples) / max(1, len(samples))}
    for n in range(1, max_n + 1):
        grams = [_ngrams(s, n) for s in samples]
        pooled = [g for gs in grams for g in gs]
        out[f"distinct_{n}"] = len(set(pooled)) / len(pooled) if pooled else 0.0
        reps = [1.0 - len(set(gs)) / len(gs) for gs in grams if gs]
        out[f"rep_{n}"] = sum(reps) / len(reps) if reps else 0.0
    return out


def load_eval_lm(path: str, device="cpu", max_length: int | None = None):
    """``eval.eval_lm``: a file (a dlmtrain ``ar`` .ckpt) -> CheckpointLM, else a Hugging Face directory -> EvalLM."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_file() or p.suffix == ".ckpt":
        return CheckpointLM(str(p), device, max_length)
    return EvalLM(path, device, max_length)


class _TextScorer:
    """``nll(texts)`` -> per text (sum of NLL in nats, number of scored tokens); the rest derives."""

    model: torch.nn.Module
    device: torch.device

    def nll(self, texts: list[str], batch_size: int = 8) -> list[tuple[float, int]]:  # pragma: no cover
        raise NotImplementedError

    def perplexity(self, texts: list[str]) -> float:
        scored = self.nll(texts)
        tokens = sum(n for _, n in scored)
        return math.exp(sum(s for s, _ in scored) / tokens) if tokens else float("nan")

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


class CheckpointLM(_TextScorer):
    """A dlmtrain ``ar`` checkpoint as the evaluation LM (EMA weights, eval mode).

    Texts are retokenized with the tokenizer of the data it was trained on (its config's
    data.manifest) and scored exactly: -log p(ids) with the first token predicted from the
    start token (dlmtrain/diffusion/autoregressive.py), so every token counts. Texts longer
    than ``max_length`` tokens (default: the training seq_len) are cut to it.
    """

    def __init__(self, path: str, device="cpu", max_length: int | None = None):
        from dlmtrain.checkpoint import load_checkpoint
        from dlmtrain.errors import ConfigError
        from dlmtrain.eval.commands import _datamodule

        try:
            module = load_checkpoint(path, map_location=device)
        except ConfigError as e:
            raise ConfigError(f"eval.eval_lm={path}: {e}") from None
        if module.cfg.objective.name != "ar":
            raise ConfigError(f"eval.eval_lm={path} is a {module.cfg.objective.name} checkpoint; generative perplexity "
                              "needs an autoregressive one (objective ar) or a Hugging Face causal-LM directory")
        dm = _datamodule(module, None, [], 1)
        self.model, self.tokenizer, self.device = module, dm.tokenizer, torch.device(device)
        self.max_length = int(max_length or dm.seq_len)

    @torch.no_grad()
    def nll(self, texts: list[str], batch_size: int = 8) -> list[tuple[float, int]]:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [self.tokenizer.encode(t)[: self.max_length] for t in texts[i:i + batch_size]]
            L = max(1, max(len(x) for x in ids))
            inp = torch.zeros(len(ids), L, dtype=torch.long)
            att = torch.zeros(len(ids), L, dtype=torch.bool)
            for j, x in enumerate(ids):
                inp[j, :len(x)] = torch.tensor(x, dtype=torch.long)
                att[j, :len(x)] = True
            inp, att = inp.to(self.device), att.to(self.device)
            nats = self.model.nelbo(inp, att)
            out.extend((float(nats[j]), len(x)) for j, x in enumerate(ids))
        return out


class EvalLM(_TextScorer):
    """A causal LM that scores text: a local Hugging Face directory (``transformers``, offline).

    Loaded once, in eval mode, on ``device``. ``nll(texts)`` returns per text (sum of NLL
    in nats, number of scored tokens).
    """

    def __init__(self, path: str, device="cpu", max_length: int | None = None):
        from pathlib import Path

        from dlmtrain.errors import ConfigError

        p = Path(path).expanduser()
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise ConfigError(f"eval.eval_lm={path}: not a Hugging Face model directory (no config.json); give the "
                              "path of a causal LM saved with save_pretrained, a dlmtrain ar .ckpt, or "
                              "eval.eval_lm='' to skip")
        try:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError("eval.eval_lm needs transformers: pip install 'dlmtrain[eval]' (or transformers)") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(p))
            self.model = AutoModelForCausalLM.from_pretrained(str(p)).to(device).eval()
        except Exception as e:
            raise ConfigError(f"eval.eval_lm={path}: cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.device = torch.device(device)
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 1024
        self.prefix_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if self.prefix_id is None:
            raise ConfigError(f"eval.eval_lm={path}: its tokenizer has neither a BOS nor an EOS token to start texts with")

    @torch.no_grad()
    def nll(self, texts: list[str], batch_size: int = 8) -> list[tuple[float, int]]:
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            ids = [[self.prefix_id] + self.tokenizer.encode(t, add_special_tokens=False)[: self.max_length - 1]
                   for t in chunk]
            L = max(len(x) for x in ids)
            inp = torch.zeros(len(ids), L, dtype=torch.long)
            att = torch.zeros(len(ids), L, dtype=torch.long)
            for j, x in enumerate(ids):
                inp[j, :len(x)] = torch.tensor(x)
                att[j, :len(x)] = 1
            inp, att = inp.to(self.device), att.to(self.device)
            logits = self.model(input_ids=inp, attention_mask=att).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = inp[:, 1:]
            tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * att[:, 1:]
            for j in range(len(chunk)):
                out.append((float(tok_nll[j].sum()), int(att[j, 1:].sum())))
        return out
