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
