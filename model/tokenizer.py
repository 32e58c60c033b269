"""Tokenizers: one protocol, two backends chosen by what the checkpoint directory holds.

- `tokenizer.json` (HF fast tokenizers) through the `tokenizers` package;
- `tokenizer.model` (SentencePiece) through tensorflow-text's `SentencepieceTokenizer`. Not the
  Fast one: its ids differ from sentencepiece's for BPE models. tensorflow_text costs seconds to
  import, so it is imported on first use.
Both read through fsspec, so a gs:// checkpoint brings its tokenizer along.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Protocol, Sequence

import fsspec

from model.platform import native_stderr_silenced


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     parse_special: bool = False) -> list[list[int]]: ...

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]: ...

    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> list[bytes | None]: ...


class _Base:
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.encode_batch([text], add_bos)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_batch([ids])[0]


class SentencePieceTokenizer(_Base):
    """A SentencePiece model run by tensorflow-text (ids equal the sentencepiece library's), or
    with backend="sentencepiece" by the sentencepiece library itself: the same ids and text,
    without importing TensorFlow (seconds), for notebook previews. The Beam job uses tensorflow-text."""

    BACKENDS = ("tensorflow", "sentencepiece")

    def __init__(self, model_proto: bytes, backend: str = "tensorflow"):
        import sentencepiece  # light: reads the special ids and vocabulary size; the backend="sentencepiece" runner

        if backend not in self.BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {self.BACKENDS}")
        with native_stderr_silenced():
            sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self._proto, self._sp, self.backend = model_proto, sp, backend
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0
        self._special = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True)))
                                      + ")") if self._special else None
        self._tf = None
        self._lock = threading.Lock()

    def _backend(self):
        with self._lock:
            if self._tf is None:
                with native_stderr_silenced():
                    import tensorflow as tf
                    import tensorflow_text as tf_text

                    try:  # TensorFlow only tokenizes here: it must not take a GPU (or its memory) from JAX
                        tf.config.set_visible_devices([], "GPU")
                    except RuntimeError:  # TensorFlow was initialized before: too late to hide them
                        pass
                    sp = tf_text.SentencepieceTokenizer(model=self._proto, out_type=tf.int32)
                    sp.tokenize(tf.constant([""]))  # loads the model now, while its log line is silenced
                self._tf = (tf, sp)
        return self._tf

    def special_tokens(self) -> dict[str, int]:
        """Text of each control piece ('<s>', '</s>', '<unk>', ...) -> its id."""
        return dict(self._special)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     parse_special: bool = False) -> list[list[int]]:
        """parse_special: the text of a control piece ('<s>' in a rendered chat template) becomes
        its id, as HF tokenizers treat special tokens; sentencepiece itself would spell it out."""
        if parse_special and self._special_re is not None:
            return self._encode_parsing_special(texts, add_bos)
        if not texts:
            return []
        if self.backend == "sentencepiece":
            ids = self._sp.encode(list(texts))
        else:
            tf, sp = self._backend()
            ids = sp.tokenize(tf.constant(list(texts), dtype=tf.string)).to_list()
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [bos + row for row in ids]

    def _encode_parsing_special(self, texts: Sequence[str], add_bos: bool) -> list[list[int]]:
        parts = [[p for p in self._special_re.split(t) if p] for t in texts]
        plain = [p for row in parts for p in row if p not in self._special]
        encoded = iter(self.encode_batch(plain, add_bos=False))
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [bos + [i for p in row for i in ([self._special[p]] if p in self._special else next(encoded))]
                for row in parts]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        if not ids:
            return []
        special = {self.bos_id, self.eos_id, self.pad_id}
        rows = [[int(t) for t in row if t not in special] for row in ids]
        if self.backend == "sentencepiece":
            out = self._sp.decode(rows, out_type=bytes)
        else:
            tf, sp = self._backend()
            out = sp.detokenize(tf.ragged.constant(rows, dtype=tf.int32, row_splits_dtype=tf.int64)).numpy()
        return [s.decode("utf-8", errors="replace") for s in out]

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id adds to a text it continues ('▁' is a space, '<0x0A>' the byte
        0x0A); None for control and unknown pieces, which never stand for text."""
        sp = self._sp
        return [None if sp.is_control(i) or sp.is_unknown(i)
                else bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                else sp.id_to_piece(i).replace("\u2581", " ").encode()
                for i in range(self.vocab_size)]


class HFTokenizer(_Base):
    """A HF `tokenizer.json`; its post-processor decides whether BOS is added."""

    def __init__(self, tokenizer_json: str, special: dict[str, int | None]):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = special.get("bos"), special.get("eos")
        self.pad_id = special.get("pad") or 0

    def special_tokens(self) -> dict[str, int]:
        """Text of each special added token -> its id."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     parse_special: bool = False) -> list[list[int]]:
        """The `tokenizers` library always turns the text of an added token into its id, so
        parse_special changes nothing here."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self._tok.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id adds to a text it continues; None for special tokens and unused ids.
        Byte-level vocabularies (GPT-2, Llama 3) map characters back to bytes; SentencePiece-style
        ones (Llama 2: '▁' for space, '<0xNN>' byte fallback) are read as their decoder says."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        added = self._tok.get_added_tokens_decoder()
        out: list[bytes | None] = [None] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                out[i] = None if added[i].special else piece.encode()
            elif "ByteLevel" in kinds:
                out[i] = bytes(_BYTE_OF_CHAR[c] for c in piece)
            elif "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(piece):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode()
        return out


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(rest)}}


_BYTE_OF_CHAR = _byte_level_chars()
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read(url: str, mode: str = "rb"):
    with fsspec.open(url, mode) as f:
        return f.read()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer reads, in its order of preference


def has_tokenizer(path: str) -> bool:
    """Whether a checkpoint directory holds a tokenizer load_tokenizer can read (no file is read)."""
    fs, root = fsspec.core.url_to_fs(path)
    return any(fs.exists(root.rstrip("/") + "/" + name) for name in TOKENIZER_FILES)


def load_tokenizer(path: str, sentencepiece_backend: str = "tensorflow") -> Tokenizer | None:
    """The tokenizer in a checkpoint directory (tokenizer.json preferred), or None if it has none.
    sentencepiece_backend: what runs a tokenizer.model (see SentencePieceTokenizer)."""
    fs, root = fsspec.core.url_to_fs(path)
    join = lambda name: path.rstrip("/") + "/" + name  # noqa: E731
    if fs.exists(root.rstrip("/") + "/tokenizer.json"):
        special = _special_ids(path, fs, root)
        return HFTokenizer(_read(join("tokenizer.json"), "r"), special)
    if fs.exists(root.rstrip("/") + "/tokenizer.model"):
        return SentencePieceTokenizer(_read(join("tokenizer.model")), sentencepiece_backend)
    return None


def _special_ids(path: str, fs, root: str) -> dict[str, int | None]:
    """bos/eos/pad ids from the checkpoint's config.json (empty if it has none)."""
    out: dict[str, int | None] = {}
    cfg_path = root.rstrip("/") + "/config.json"
    if fs.exists(cfg_path):
        cfg = json.loads(_read(path.rstrip("/") + "/config.json", "r"))
        eos = cfg.get("eos_token_id")
        out = {"bos": cfg.get("bos_token_id"), "eos": eos[0] if isinstance(eos, list) else eos,
               "pad": cfg.get("pad_token_id")}
    return out


def decode_completions(tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                       completions: Sequence[Sequence[int]]) -> list[str]:
    """Completion texts as they continue their prompts: decoding the completion alone would drop
    a leading space (SentencePiece strips it at the start of a text) or split a character."""
    whole = tokenizer.decode_batch([list(p) + list(c) for p, c in zip(prompts, completions)])
    heads = tokenizer.decode_batch(prompts)
    out = [w[len(h):] if w.startswith(h) else None for w, h in zip(whole, heads)]
    misses = [i for i, t in enumerate(out) if t is None]  # rare: the prompt's text changed when continued
    for i, text in zip(misses, tokenizer.decode_batch([completions[i] for i in misses]) if misses else []):
        out[i] = text
    return out
