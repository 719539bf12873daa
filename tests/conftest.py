"""Shared test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def make_corpus(tmp_path_factory):
    """``make_corpus(words, docs=40, words_per_doc=60, seed=0, *data_prep_args) -> manifest path``:
    random documents over ``words`` as text files, prepared with the byte tokenizer (seq_len 64)."""

    def make(words, docs: int = 40, words_per_doc: int = 60, seed: int = 0, *args: str) -> Path:
        root = tmp_path_factory.mktemp("corpus")
        (root / "text").mkdir()
        g = torch.Generator().manual_seed(seed)
        for i in range(docs):
            idx = torch.randint(0, len(words), (words_per_doc,), generator=g).tolist()
            (root / "text" / f"doc{i:03d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
        r = subprocess.run([sys.executable, "-m", "data_prep", str(root / "text"), "--out", str(root / "shards"),
                            "--tokenizer", "bytes", "--seq-len", "64", *args],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return root / "shards" / "manifest.json"

    return make


class MarkovAR(torch.nn.Module):
    """An ``ar`` backbone with a stationary Markov chain's true conditionals: logits log pi after
    the start token (id k), log P[prev] after a token. Reads only each position's own input, so
    it serves full passes and KV-cache steps alike (the cache is ignored)."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        from dlmtrain.data.synthetic import stationary

        pi = torch.as_tensor(stationary(P.numpy()), dtype=torch.float64)
        self.logp = torch.cat([P.double().log(), pi.log()[None]])  # [k + 1, k]
        self.out_dim = P.shape[0]
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        return self.logp[input_ids]


@pytest.fixture
def markov_ar():
    """``markov_ar(P, *overrides) -> AR module`` whose backbone is :class:`MarkovAR`."""

    def make(P, *extra):
        from dlmtrain import build_module, load_config

        cfg = load_config(None, ["objective=ar", "model=tiny", f"model.vocab_size={len(P)}", "optim.ema=0", *extra])
        m = build_module(cfg)
        m.backbone = MarkovAR(torch.as_tensor(P, dtype=torch.float64))
        return m.eval()

    return make
