"""Synthetic shard sets (random tokens, random document lengths) for benchmarks and tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlmtrain.data.format import FORMAT, FORMAT_VERSION, ShardWriter, write_json_atomic


def write_synthetic(out_dir: str | Path, *, seq_len: int = 1024, dtype: str = "uint16", vocab_size: int = 50304,
                    train_shards: int = 4, samples_per_shard: int = 1000, val_shards: int = 1,
                    val_samples_per_shard: int | None = None, mean_doc_tokens: int = 600, seed: int = 0) -> Path:
    """Write shards of random sequences and a manifest; returns the manifest path.

    Token ids are uniform in ``[4, vocab_size)``; EOS is id 2 and ends documents of
    geometric length (mean ``mean_doc_tokens``), so ``doc_starts`` are realistic.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    eos = 2
    splits = {}
    for split, n_shards, per in (("train", train_shards, samples_per_shard),
                                 ("val", val_shards, val_samples_per_shard or samples_per_shard)):
        w = ShardWriter(out, split, seq_len=seq_len, dtype=dtype, target_bytes=1 << 62)
        shards = []
        for _ in range(n_shards):
            for _ in range(per):
                ids = rng.integers(4, vocab_size, size=seq_len, dtype=np.int64)
                ends = np.flatnonzero(rng.random(seq_len) < 1.0 / mean_doc_tokens)
                ends = ends[ends < seq_len - 1]
                ids[ends] = eos
                w.add(ids, (ends + 1).astype(np.int32))
            shards.append(w.finish())
        splits[split] = {"shards": shards, "samples": n_shards * per, "tokens_written": n_shards * per * seq_len}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created_by": "dlmtrain.data.synthetic",
        "seq_len": seq_len, "dtype": dtype, "vocab_size": vocab_size,
        "eos_id": eos, "bos_id": 1, "pad_id": 0, "mask_id": 3,
        "tokenizer": {"kind": "bytes", "file": None, "vocab_size": 260, "special_tokens": {}},
        "splits": splits,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out / "manifest.json"


def stationary(P: np.ndarray) -> np.ndarray:
    """The stationary distribution of a row-stochastic matrix ``P``."""
    w, v = np.linalg.eig(np.asarray(P, dtype=np.float64).T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def markov_log_prob(ids: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Exact log p(x) in nats of each row of ``ids`` [N, L] under the stationary chain ``P``."""
    P = np.asarray(P, dtype=np.float64)
    ids = np.asarray(ids)
    lp = np.log(stationary(P)[ids[:, 0]])
    return lp + np.log(P[ids[:, :-1], ids[:, 1:]]).sum(1)


def write_markov(out_dir: str | Path, P, *, seq_len: int = 32, train_samples: int = 4096, val_samples: int = 256,
                 samples_per_shard: int = 1024, seed: int = 0) -> Path:
    """Shards of sequences from a stationary Markov chain over token ids 0..k-1 (k = len(P)), a
    source whose entropy is known exactly (see :func:`markov_log_prob`); one document per
    sequence, no EOS inside. The manifest declares vocab_size k + 1 (EOS = k) and the byte
    tokenizer, so token i decodes to the byte i (bits per byte = bits per token). Returns the
    manifest path."""
    P = np.asarray(P, dtype=np.float64)
    k = len(P)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pi = stationary(P)
    cum = np.cumsum(P, axis=1)
    splits = {}
    for split, n in (("train", train_samples), ("val", val_samples)):
        w = ShardWriter(out, split, seq_len=seq_len, dtype="uint16", target_bytes=1 << 62)
        shards = []
        for i in range(n):
            x = np.empty(seq_len, dtype=np.int64)
            x[0] = rng.choice(k, p=pi)
            u = rng.random(seq_len)
            for j in range(1, seq_len):
                x[j] = min(int(np.searchsorted(cum[x[j - 1]], u[j], side="right")), k - 1)
            w.add(x, np.zeros(0, dtype=np.int32))
            if (i + 1) % samples_per_shard == 0:
                shards.append(w.finish())
        last = w.finish()
        if last:
            shards.append(last)
        splits[split] = {"shards": shards, "samples": n, "tokens_written": n * seq_len}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created_by": "dlmtrain.data.synthetic.write_markov",
        "seq_len": seq_len, "dtype": "uint16", "vocab_size": k + 1, "eos_id": k, "bos_id": None, "pad_id": None,
        "mask_id": None, "tokenizer": {"kind": "bytes", "file": None, "vocab_size": 260, "special_tokens": {}},
        "splits": splits, "markov": {"P": P.tolist()},
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out / "manifest.json"
