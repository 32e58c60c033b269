"""Tokenizers: ids equal the reference libraries; text of every script round-trips."""

import io
import json

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import HFTokenizer, SentencePieceTokenizer, decode_completions, load_tokenizer

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "A hacker is a person who enjoys exploring the details of programmable systems.",
    "The quick brown fox jumps over the lazy dog; 1234567890 times!",
    "Static shapes everywhere: prompts pad to buckets, and each shape compiles once.",
] * 50

TEXTS = [
    "The hacker wrote a kludge.",
    "  leading spaces and\ttabs\nand newlines  ",
    "emoji: 🚀🤖 family 👨‍👩‍👧 flag 🇯🇵",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0336\u0335",
    "right-to-left: مرحبا بالعالم — שלום עולם",
    "",
]


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf_tokenizer_json() -> str:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def test_sentencepiece_ids_equal_the_sentencepiece_library(sp_model):
    ours = SentencePieceTokenizer(sp_model)
    ref = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    assert ours.encode_batch(TEXTS + CORPUS[:4], add_bos=False) == ref.encode(TEXTS + CORPUS[:4])
    assert ours.encode(TEXTS[0]) == [1] + ref.encode(TEXTS[0])
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 0, 400)


def test_sentencepiece_round_trips_every_script(sp_model):
    ours = SentencePieceTokenizer(sp_model)
    ref = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    ids = ours.encode_batch(TEXTS)
    assert ours.decode_batch(ids) == [ref.decode(ref.encode(t)) for t in TEXTS]
    # identity normalization + byte fallback: nothing outside the vocabulary is lost
    assert ours.decode_batch(ids[:-1]) == [t.strip() if t[0] == " " else t for t in TEXTS[:-1]]


def test_hf_tokenizer_ids_equal_the_tokenizers_library(hf_tokenizer_json):
    ours = HFTokenizer(hf_tokenizer_json, {"bos": 1, "eos": 2, "pad": 0})
    ref = tokenizers.Tokenizer.from_str(hf_tokenizer_json)
    assert ours.encode_batch(TEXTS) == [e.ids for e in ref.encode_batch(TEXTS)]
    assert ours.decode_batch(ours.encode_batch(TEXTS)) == TEXTS


def test_checkpoint_directory_decides_the_backend(tmp_path, sp_model, hf_tokenizer_json):
    assert load_tokenizer(str(tmp_path)) is None
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    assert isinstance(load_tokenizer(str(tmp_path)), SentencePieceTokenizer)
    (tmp_path / "tokenizer.json").write_text(hf_tokenizer_json)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 0}))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2)


def test_completion_text_keeps_its_leading_space(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    prompt, completion = tok.encode("The hacker"), tok.encode(" wrote a kludge.", add_bos=False)
    assert tok.decode(completion) == "wrote a kludge."  # decoding alone loses the space
    assert decode_completions(tok, [prompt], [completion]) == [" wrote a kludge."]


def test_the_sentencepiece_backend_gives_the_ids_and_text_of_tensorflow_text(sp_model):
    """The preview runs SentencePiece models without TensorFlow: ids and decoded text (random ids
    included, so byte-fallback pieces that end inside a character) must equal tensorflow-text's."""
    tf_tok, sp_tok = SentencePieceTokenizer(sp_model), SentencePieceTokenizer(sp_model, backend="sentencepiece")
    texts = TEXTS + CORPUS + ["<s> a </s> b", "  two  spaces  "]
    assert sp_tok.encode_batch(texts) == tf_tok.encode_batch(texts)
    assert sp_tok.encode_batch(texts, add_bos=False, parse_special=True) == tf_tok.encode_batch(
        texts, add_bos=False, parse_special=True)
    rng = np.random.default_rng(0)
    rows = tf_tok.encode_batch(texts) + [rng.integers(0, 400, size=int(n)).tolist() for n in rng.integers(0, 12, 200)]
    assert sp_tok.decode_batch(rows) == tf_tok.decode_batch(rows)
    with pytest.raises(ValueError, match="backend='torch'"):
        SentencePieceTokenizer(sp_model, backend="torch")
