"""Pack tokenized documents back to back into fixed-length sequences.

Every document is followed by EOS; sequences are cut every ``seq_len`` tokens, so a
document may span several sequences. For each sequence the packer reports the
positions (> 0) where a document begins, and the stream position just past it:
``(document index, tokens of that document consumed)`` -- enough to resume packing
exactly at a sequence boundary. Whatever is left at the end (< seq_len tokens) is the
dropped tail.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class Packer:
    def __init__(self, seq_len: int, eos_id: int, dtype="uint32"):
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._buf = np.empty(seq_len, dtype=dtype)
        self._fill = 0
        self._starts: list[int] = []

    @property
    def pending(self) -> int:
        """Tokens waiting for a full sequence (the tail, if the input ends now)."""
        return self._fill

    def add(self, doc_index: int, tokens: np.ndarray, skip: int = 0) -> Iterator[tuple[np.ndarray, list[int], tuple[int, int]]]:
        """Feed one document (without EOS); yield ``(ids, doc_starts, (doc_index, consumed))`` per full sequence.

        ``skip`` drops that many leading tokens of the document (EOS counted as its last
        token), for resuming mid-document; it requires an empty buffer.
        """
        n = len(tokens) + 1  # with EOS
        pos = skip
        if skip:
            assert self._fill == 0, "resume only at a sequence boundary"
        elif self._fill > 0:
            self._starts.append(self._fill)
        L = self.seq_len
        while pos < n:
            take = min(n - pos, L - self._fill)
            body = min(take, len(tokens) - pos)  # tokens from the document proper
            if body > 0:
                self._buf[self._fill : self._fill + body] = tokens[pos : pos + body]
            if body < take:  # the EOS
                self._buf[self._fill + take - 1] = self.eos_id
            self._fill += take
            pos += take
            if self._fill == L:
                out, starts = self._buf.copy(), self._starts
                self._fill, self._starts = 0, []
                yield out, starts, (doc_index, pos)
