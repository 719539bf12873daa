"""One small tokenizer interface over a byte tokenizer and Hugging Face `tokenizers`.

Both kinds encode text without adding special tokens, treat special-token strings that
occur in the text as ordinary text (so the only EOS ids in a packed stream are the ones
data_prep appended), and decode ids back to text with special tokens spelled out.

The special tokens are named ``pad``, ``bos``, ``eos`` and ``mask``; ``eos`` is always
present (data_prep appends it to every document), the others may be absent (``None``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dlmtrain.errors import DataError

SPECIAL_NAMES = ("pad", "bos", "eos", "mask")
# The spellings used by the tokenizers we make (trained BPE, bytes).
DEFAULT_SPECIALS = {"pad": "[PAD]", "bos": "[BOS]", "eos": "[EOS]", "mask": "[MASK]"}
# Spellings recognised in tokenizers made elsewhere, most common first.
_CANDIDATES = {
    "eos": ("[EOS]", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[SEP]"),
    "bos": ("[BOS]", "<s>", "<bos>", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str`` and the special ids."""

    kind: str  # "bytes" | "hf"
    vocab_size: int
    specials: dict[str, tuple[str, int]]  # name -> (token string, id), present ones only

    @property
    def eos_id(self) -> int:
        return self.specials["eos"][1]

    @property
    def bos_id(self) -> int | None:
        return self.specials.get("bos", (None, None))[1]

    @property
    def pad_id(self) -> int | None:
        return self.specials.get("pad", (None, None))[1]

    @property
    def mask_id(self) -> int | None:
        return self.specials.get("mask", (None, None))[1]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self) -> dict:
        """The manifest's ``tokenizer`` entry (without the file name)."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": {k: {"token": t, "id": i} for k, (t, i) in sorted(self.specials.items())},
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; [PAD] [BOS] [EOS] [MASK] are 256..259."""

    kind = "bytes"

    def __init__(self):
        self.specials = {name: (DEFAULT_SPECIALS[name], 256 + i) for i, name in enumerate(SPECIAL_NAMES)}
        self.vocab_size = 256 + len(SPECIAL_NAMES)
        self._names = {i: t.encode() for t, i in self.specials.values()}

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for the byte tokenizer (vocab {self.vocab_size})")
        if arr.size == 0 or arr.max() < 256:
            return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        out = bytearray()
        for i in arr.tolist():
            out += bytes((i,)) if i < 256 else self._names[i]
        return out.decode("utf-8", errors="replace")

    def to_str(self) -> str:
        return json.dumps({"dlmtrain_byte_tokenizer": 1})


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json)."""

    kind = "hf"

    def __init__(self, tok, specials: dict[str, tuple[str, int]]):
        self._tok = tok
        try:  # special-token strings inside documents stay ordinary text
            tok.encode_special_tokens = True
        except AttributeError:  # tokenizers < 0.15
            pass
        self.specials = specials
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1 if vocab else 0)

    @property
    def backend(self):
        return self._tok

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()


def _special_from_config(directory: Path) -> dict[str, str]:
    """Special-token spellings from a transformers-style directory, if it says."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        p = directory / fname
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for name in SPECIAL_NAMES:
            v = data.get(f"{name}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and name not in found:
                found[name] = v
    return found


def load_hf(
    path: str | Path, names: dict[str, str] | None = None, add_missing_eos: bool = True
) -> HFTokenizer:
    """Load ``tokenizer.json`` (or a directory holding one) and find its special tokens.

    ``names`` overrides the spelling per special (e.g. ``{"eos": "</s>"}``). A tokenizer
    without any EOS gets ``[EOS]`` added when ``add_missing_eos``.
    """
    try:
        from tokenizers import AddedToken, Tokenizer as _Tok
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        raise DataError("reading a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    path = Path(path).expanduser()
    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no tokenizer.json" if path.is_dir() else f"tokenizer file not found: {path}"
        raise DataError(f"{where}; pass a tokenizer.json, a directory holding one, 'bytes', or --train-tokenizer")
    try:
        tok = _Tok.from_file(str(file))
    except Exception as e:
        raise DataError(f"cannot read tokenizer {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    wanted = dict(_special_from_config(directory) if path.is_dir() else {})
    wanted.update(names or {})
    specials: dict[str, tuple[str, int]] = {}
    for name in SPECIAL_NAMES:
        if name in wanted:
            tid = tok.token_to_id(wanted[name])
            if tid is None:
                if names and name in names:
                    raise DataError(f"tokenizer {file} has no token {wanted[name]!r} (asked for as the {name} token)")
            else:
                specials[name] = (wanted[name], tid)
                continue
        for cand in _CANDIDATES[name]:
            tid = tok.token_to_id(cand)
            if tid is not None:
                specials[name] = (cand, tid)
                break
    if "eos" not in specials:
        if not add_missing_eos:
            raise DataError(f"tokenizer {file} has no end-of-document token; name one with --eos-token")
        tok.add_special_tokens([AddedToken(DEFAULT_SPECIALS["eos"], special=True, normalized=False)])
        specials["eos"] = (DEFAULT_SPECIALS["eos"], tok.token_to_id(DEFAULT_SPECIALS["eos"]))
    return HFTokenizer(tok, specials)


def hf_from_str(text: str, specials: dict[str, tuple[str, int]]) -> HFTokenizer:
    from tokenizers import Tokenizer as _Tok

    return HFTokenizer(_Tok.from_str(text), specials)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def from_manifest(manifest: dict, open_text) -> Tokenizer:
    """The tokenizer a manifest names. ``open_text(name)`` returns a file's text beside the manifest."""
    info = manifest["tokenizer"]
    if info["kind"] == "bytes":
        return ByteTokenizer()
    specials = {k: (v["token"], int(v["id"])) for k, v in info["special_tokens"].items()}
    tok = hf_from_str(open_text(info["file"]), specials)
    return tok
