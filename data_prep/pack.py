"""Pack tokenized documents back to back into fixed-length sequences.

Every document is followed by EOS; sequences are cut every ``seq_len`` tokens, so a
document may span several sequences. For each sequence the packer reports the
positions (> 0) where a document begins, and the stream position just past it:
``(document index, tokens of that document consumed)`` -- enough to resume packing
exactly at a sequence boundary. Whatever is left at the end (< seq_len tokens) is the
dropped tail.

Prompt/answer pairs (``PairPacker``) are packed whole instead: prompt, answer, EOS, the next
pair...; a pair that does not fit in what is left of a sequence starts the next one, and the
rest of the sequence is padding. Each sequence reports its pairs as (start, answer_start, end).
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


class PairPacker:
    """Whole ``(prompt, answer)`` pairs back to back, each as prompt + answer + EOS, never split:
    a pair that does not fit starts a new sequence and the old one is padded with ``pad_id``.
    Pairs longer than ``seq_len`` must be left out by the caller (``fits``)."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, dtype="uint32"):
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        self.seq_len = seq_len
        self.eos_id, self.pad_id = eos_id, pad_id
        self._buf = np.empty(seq_len, dtype=dtype)
        self._fill = 0
        self._pairs: list[tuple[int, int, int]] = []

    @property
    def pending(self) -> int:
        """Tokens in the open sequence (written, padded, by ``finish``)."""
        return self._fill

    def fits(self, prompt: np.ndarray, answer: np.ndarray) -> bool:
        return len(prompt) + len(answer) + 1 <= self.seq_len

    def add(self, doc_index: int, prompt: np.ndarray, answer: np.ndarray):
        """Feed one pair; yield ``(ids, doc_starts, pairs, pad_tokens, (doc_index, consumed))`` per
        finished sequence, where consumed is 1 if this pair is in it (resume past it), else 0."""
        n = len(prompt) + len(answer) + 1
        if self._fill + n > self.seq_len:
            yield self._flush((doc_index, 0))
        f, a = self._fill, self._fill + len(prompt)
        self._buf[f:a] = prompt
        self._buf[a:f + n - 1] = answer
        self._buf[f + n - 1] = self.eos_id
        self._pairs.append((f, a, f + n))
        self._fill += n
        if self._fill == self.seq_len:
            yield self._flush((doc_index, 1))

    def finish(self):
        """The last, padded sequence (as ``add`` yields it), or None if empty."""
        return self._flush(None) if self._fill else None

    def _flush(self, position):
        fill, L = self._fill, self.seq_len
        self._buf[fill:] = self.pad_id
        starts = [s for s, _, _ in self._pairs if s > 0] + ([fill] if fill < L else [])
        out = (self._buf.copy(), starts, np.asarray(self._pairs, dtype=np.int32).reshape(-1), L - fill, position)
        self._fill, self._pairs = 0, []
        return out
