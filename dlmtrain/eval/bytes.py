"""Bytes of text per sequence: the denominator of bits per byte.

Bits per byte compares models with different tokenizers: the same text costs the same
bytes whatever the tokens. A sequence's bytes are those of the UTF-8 text its scored
tokens decode to; special tokens (EOS, BOS, PAD, MASK) count 0 bytes, since they stand
for no text.

Byte-level tokenizers (dlmtrain's ``bytes`` and byte-level BPE, what data_prep trains)
are additive, so a per-id table gives the count exactly and on device: it is the raw
bytes each token stands for, so a character cut at a sequence edge counts its bytes on
each side (a decode would count one 3-byte U+FFFD on each). Any other tokenizer is
decoded sequence by sequence on the host.
"""

from __future__ import annotations

import torch


def byte_table(tokenizer) -> torch.Tensor | None:
    """int64 [V + 1]: UTF-8 bytes of each id (specials 0; a trailing 0 for ids beyond the
    vocabulary, e.g. an appended [MASK]), or None when the tokenizer is not byte-level."""
    special = {i for _, i in tokenizer.specials.values()}
    if tokenizer.kind == "bytes":
        n = [1 if i < 256 and i not in special else 0 for i in range(tokenizer.vocab_size)]
        return torch.tensor(n + [0], dtype=torch.long)
    backend = getattr(tokenizer, "backend", None)
    try:
        from tokenizers import decoders, pre_tokenizers
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return None
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # 256 characters, one per byte (GPT-2's map)
    added = backend.get_added_tokens_decoder()  # added tokens are stored as text, not mapped bytes
    n = [0] * (tokenizer.vocab_size + 1)
    for piece, i in backend.get_vocab(with_added_tokens=True).items():
        if i in special or (i in added and added[i].special):
            continue
        if i in added:
            n[i] = len(piece.encode("utf-8"))
        elif set(piece) <= alphabet:
            n[i] = len(piece)
        else:  # not a byte-level vocabulary after all
            return None
    return torch.tensor(n, dtype=torch.long)


class ByteCounter:
    """``counter(input_ids [B, L], scored [B, L] bool) -> int64 [B]`` bytes of each row's scored text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.table = byte_table(tokenizer)
        self.special = torch.tensor(sorted(i for _, i in tokenizer.specials.values()), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            if self.table.device != input_ids.device:
                self.table = self.table.to(input_ids.device)
            n = self.table[input_ids.clamp(0, len(self.table) - 1)]
            return (n * scored).sum(-1)
        keep = scored & ~torch.isin(input_ids, self.special.to(input_ids.device))
        ids, keep = input_ids.cpu(), keep.cpu()
        counts = [len(self.tokenizer.decode(ids[b][keep[b]].tolist()).encode("utf-8")) for b in range(ids.shape[0])]
        return torch.tensor(counts, dtype=torch.long, device=input_ids.device)
