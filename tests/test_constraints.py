"""Constraints compiled to token automata: every path through one is a valid output, EOS comes only
where the output may end, and the device functions mask and advance rows of different automata in
one batch without touching unconstrained rows."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model import constraints
from model.constraints import compile_constraint
from model.tokenizer import HFTokenizer, load_tokenizer

SCHEMA = {"type": "object",
          "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "confidence": {"type": "number"},
                         "reason": {"type": "string", "maxLength": 40}},
          "required": ["label", "confidence", "reason"]}
REGEX = r"[A-Z][a-z]{2,9}-[0-9]{3}"
CHOICES = ["positive", "negative", "neutral"]
ODD_CHOICES = ["a.b", "x|y", "(paren)", "new\nline", "naïve", "tab\t", 'quote"', "back\\slash", "-dash",
               "#hash", "space here", "[set]", "a", "ab"]


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer("model/assets/demo", "sentencepiece")


@pytest.fixture(scope="module")
def byte_level():
    """A small byte-level BPE (GPT-2 / Llama 3 style) with an EOS id."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"label": "positive", "confidence": 0.93, "reason": "clear praise"}',
              "Abcdef-123 Hello-456 the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(tok.to_str(), {"bos": 0, "eos": 1})


class Letters:
    """A tokenizer whose only text tokens are 'a', 'b' and 'ab': some regexes cannot be written."""

    eos_id, vocab_size = 0, 4

    def token_bytes(self):
        return [None, b"a", b"b", b"ab"]


def walks(auto, token_bytes, n: int, seed: int = 0, free_steps: int = 30) -> list[bytes]:
    """n random paths from the initial state to EOS, as bytes: uniform over the allowed tokens for
    free_steps, then always towards the nearest accepting state, so every walk ends."""
    rng = np.random.default_rng(seed)
    dense = auto.dense()
    eos_class = auto.num_classes - 1
    text = np.array([auto.token_class[t] != eos_class for t in range(auto.vocab_size)])
    far = np.iinfo(np.int32).max
    distance = np.where(auto.accepting, 0, far)  # tokens to the nearest accepting state
    while True:
        via = np.where(auto.next_state >= 0, distance[np.maximum(auto.next_state, 0)], far).min(1)
        updated = np.minimum(distance, np.where(via < far, via + 1, far))
        if (updated == distance).all():
            break
        distance = updated
    out = []
    for _ in range(n):
        state, pieces = 0, []
        for step in range(10_000):
            allowed = np.flatnonzero((dense[state] >= 0) & text)
            if auto.accepting[state] and (not allowed.size or rng.random() < 0.3):
                break
            if step >= free_steps:
                allowed = allowed[distance[dense[state, allowed]] < distance[state]]
            t = int(rng.choice(allowed))
            pieces.append(token_bytes[t])
            state = int(dense[state, t])
        else:
            raise AssertionError("walk did not end")
        out.append(b"".join(pieces))
    return out


def byte_path(tokenizer, text: str) -> list[int]:
    """text as single-byte tokens (a tokenization every byte-fallback or byte-level vocabulary has)."""
    single = {b: i for i, b in enumerate(tokenizer.token_bytes()) if b is not None and len(b) == 1}
    return [single[bytes([c])] for c in text.encode()]


def accepts(auto, tokens) -> bool:
    state = 0
    for t in tokens:
        state = auto.step(state, t)
        if state < 0:
            return False
    return bool(auto.accepting[state])


@pytest.mark.parametrize("tok_name", ["demo", "byte_level"])
def test_token_bytes_spell_what_the_tokenizer_encodes(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    tb = tok.token_bytes()
    for text in ["In the beginning", '{"label": "x"}', "naïve — ünïcödé ✓\n\ttabs", "Abcdef-123"]:
        spelled = b"".join(tb[i] for i in tok.encode(text, add_bos=False)).decode("utf-8")
        assert spelled == text or (tok_name == "demo" and spelled == " " + text)  # SentencePiece's dummy prefix
    assert tb[tok.eos_id] is None and (tok.bos_id is None or tb[tok.bos_id] is None)


@pytest.mark.parametrize("tok_name", ["demo", "byte_level"])
def test_schema_outputs_validate_and_valid_json_is_accepted(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    auto = compile_constraint("json_schema", SCHEMA, tok)
    for raw in walks(auto, tok.token_bytes(), 40):
        jsonschema.validate(json.loads(raw.decode("utf-8")), SCHEMA)
    good = '{"label":"neutral","confidence":-0.5e+3,"reason":"a \\"quoted\\" word"}'
    assert accepts(auto, byte_path(tok, good))
    for bad in ['{"label":"great","confidence":1,"reason":"x"}', '{"label":"neutral","confidence":1}',
                '{"label":"neutral","confidence":1,"reason":"' + "x" * 41 + '"}']:
        assert not accepts(auto, byte_path(tok, bad)), bad


@pytest.mark.parametrize("tok_name", ["demo", "byte_level"])
def test_regex_outputs_match(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    auto = compile_constraint("regex", REGEX, tok)
    for raw in walks(auto, tok.token_bytes(), 60):
        assert re.fullmatch(REGEX, raw.decode("utf-8")), raw
    assert accepts(auto, byte_path(tok, "Hello-123"))
    assert not accepts(auto, byte_path(tok, "Hello-12"))


def test_choice_outputs_are_members_and_every_member_is_reachable(demo):
    for choices in (CHOICES, ODD_CHOICES):
        auto = compile_constraint("choice", choices, demo)
        seen = {raw.decode("utf-8") for raw in walks(auto, demo.token_bytes(), 200)}
        assert seen <= set(choices)
        assert all(accepts(auto, byte_path(demo, c)) for c in choices)
        assert not accepts(auto, byte_path(demo, choices[0] + "x"))
    assert seen >= {"a", "ab"}  # a member that prefixes another can end there or go on


def test_json_object_outputs_are_objects(demo):
    auto = compile_constraint("json_object", None, demo)
    for raw in walks(auto, demo.token_bytes(), 40):
        assert isinstance(json.loads(raw.decode("utf-8")), dict)
    nested = '{"a": [1, "x", null], "b": {"c": true}, "d": -2.5}'
    assert accepts(auto, byte_path(demo, nested))
    assert not accepts(auto, byte_path(demo, '{"a": {"b": {"c": 1}}}'))  # deeper than the bound


def test_eos_is_allowed_exactly_in_accepting_states(demo):
    for kind, spec in (("json_schema", SCHEMA), ("regex", REGEX), ("choice", ODD_CHOICES)):
        auto = compile_constraint(kind, spec, demo, eos_ids=(demo.eos_id, 7))
        dense = auto.dense()
        for eos in (demo.eos_id, 7):
            np.testing.assert_array_equal(dense[:, eos] >= 0, auto.accepting)
        assert not auto.accepting[0]
        assert ((dense >= 0).any(1)).all()  # no state is a dead end
    plain = compile_constraint("regex", REGEX, demo)
    assert plain.step(0, 7) == -1 and plain.step(0, byte_path(demo, "H")[0]) >= 0  # here 7 is a plain byte token


def test_dead_ends_are_pruned_and_impossible_specs_are_errors():
    auto = compile_constraint("regex", "(ab*c)|ab", Letters())  # no token writes "c": only "ab" can end
    assert ((auto.dense() >= 0).any(1)).all()
    assert accepts(auto, [1, 2]) and accepts(auto, [3])
    assert auto.step(auto.step(0, 3), 2) == -1
    with pytest.raises(ValueError, match="cannot be completed with this tokenizer's tokens"):
        compile_constraint("regex", "ab*c", Letters())
    with pytest.raises(ValueError, match=r"incompatible with the regex 'c'"):
        compile_constraint("regex", "c", Letters())


def test_an_alternative_that_prefixes_a_later_one_does_not_cut_it_short(demo):
    """outlines-core alone (leftmost-first) would never write "ab" for "(a|ab)"."""
    auto = compile_constraint("regex", "(a|ab|abc)x?", demo)
    for text in ("a", "ab", "abc", "abx", "abcx"):
        assert accepts(auto, byte_path(demo, text)), text
    assert {raw.decode() for raw in walks(auto, demo.token_bytes(), 100)} == {
        "a", "ab", "abc", "ax", "abx", "abcx"}


def test_padded_vocab_ids_are_never_allowed(demo):
    auto = compile_constraint("regex", REGEX, demo, vocab_size=demo.vocab_size + 64)
    assert auto.vocab_size == demo.vocab_size + 64
    assert not (auto.dense()[:, demo.vocab_size:] >= 0).any()


def test_cache_compiles_a_spec_once_per_vocabulary(demo):
    constraints.cache_clear()
    first = compile_constraint("json_schema", SCHEMA, demo)
    assert compile_constraint("json_schema", json.dumps(SCHEMA), demo) is first
    again = load_tokenizer("model/assets/demo", "sentencepiece")  # another object, same vocabulary
    assert compile_constraint("json_schema", dict(SCHEMA), again) is first
    assert constraints.cache_info() == constraints.CacheInfo(hits=2, misses=1, size=1)
    reordered = {"type": "object", "properties": dict(reversed(SCHEMA["properties"].items()))}
    assert compile_constraint("json_schema", reordered, demo) is not first  # field order is part of the spec
    assert compile_constraint("json_schema", SCHEMA, demo, eos_ids=(2, 3)) is not first
    assert constraints.cache_info().misses == 3


def test_cache_evicts_least_recently_used(demo, monkeypatch):
    monkeypatch.setattr(constraints, "_cache", constraints._LRU(2))
    a = compile_constraint("choice", ["x"], demo)
    compile_constraint("choice", ["y"], demo)
    assert compile_constraint("choice", ["x"], demo) is a  # x is now the most recent
    compile_constraint("choice", ["z"], demo)  # evicts y
    assert compile_constraint("choice", ["x"], demo) is a
    compile_constraint("choice", ["y"], demo)
    assert constraints.cache_info() == constraints.CacheInfo(hits=2, misses=4, size=2)


@pytest.mark.parametrize("kind, spec, message", [
    ("json_schema", {"type": "strin"}, "strin"),
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", ["type", "object"], "must be a JSON object; got list"),
    ("json_schema", {"type": "string", "pattern": "(?=lookahead)"}, "cannot be compiled"),
    ("regex", "([a-z]", "regex cannot be compiled"),
    ("regex", 5, "must be a string"),
    ("choice", [], "empty"),
    ("choice", "positive", "list of strings"),
    ("choice", ["ok", 3], "3 is a int"),
    ("grammar", "root ::= x", "expected one of"),
])
def test_bad_specs_are_value_errors_naming_the_reason(demo, kind, spec, message):
    for _ in range(2):  # a spec that failed fails the same way from the cache
        with pytest.raises(ValueError, match=re.escape(message)):
            compile_constraint(kind, spec, demo)


@pytest.fixture(scope="module")
def packed(demo):
    autos = [compile_constraint("json_schema", SCHEMA, demo), compile_constraint("regex", REGEX, demo),
             compile_constraint("choice", CHOICES, demo)]
    table, offsets = constraints.pack(autos, max_states=2048, max_classes=128, max_automata=4,
                                      vocab_size=demo.vocab_size)
    return autos, jax.device_put(table), offsets


def test_mask_keeps_unconstrained_rows_bit_identical(demo, packed):
    autos, table, offsets = packed
    logits = jax.random.normal(jax.random.key(1), (4, demo.vocab_size)) * 1e3
    state = jnp.asarray([offsets[0], offsets[1], offsets[2], offsets[1]])
    constrained = jnp.asarray([True, True, True, False])
    out = np.asarray(jax.jit(constraints.mask_logits)(logits, state, table, constrained))
    x = np.asarray(logits)
    assert out[3].tobytes() == x[3].tobytes()
    for row, auto in enumerate(autos):
        allowed = np.zeros(demo.vocab_size, bool)
        allowed[auto.allowed(0)] = True
        np.testing.assert_array_equal(out[row][allowed], x[row][allowed])
        assert np.isneginf(out[row][~allowed]).all()
    none = jax.jit(constraints.mask_logits)(logits, state, table, jnp.zeros(4, bool))
    assert np.asarray(none).tobytes() == x.tobytes()


def test_advance_follows_each_automaton(packed):
    autos, table, offsets = packed
    rng = np.random.default_rng(0)
    for a, auto in enumerate(autos):
        local = rng.integers(0, auto.num_states, 16)
        tokens = np.array([rng.choice(auto.allowed(s)) if rng.random() < 0.8 else rng.integers(auto.vocab_size)
                           for s in local], np.int32)
        expected = np.array([auto.step(s, t) for s, t in zip(local, tokens)])
        expected = np.where(expected >= 0, expected, local) + offsets[a]  # a token not allowed keeps the state
        got = constraints.advance(jnp.asarray(local + offsets[a]), jnp.asarray(tokens), table, jnp.ones(16, bool))
        np.testing.assert_array_equal(np.asarray(got), expected)
    still = constraints.advance(jnp.asarray([5]), jnp.asarray([9]), table, jnp.zeros(1, bool))
    assert int(still[0]) == 5


def test_batched_scan_mixes_automata_and_free_rows(demo, packed):
    """A decode loop as the engine would run it: sampled rows of three automata and free rows in one
    jitted scan; every finished constrained row is valid, and free rows sample exactly what they
    would without any constraint in the batch."""
    autos, table, offsets = packed
    batch, steps, eos = 12, 96, demo.eos_id
    which = np.arange(batch) % 4  # 3 = unconstrained
    constrained = jnp.asarray(which < 3)
    start = jnp.asarray(np.where(which < 3, offsets[np.minimum(which, 2)], 0))

    @jax.jit
    def decode(key, constrained):
        def step(carry, k):
            state, done = carry
            logits = jax.random.normal(k, (batch, demo.vocab_size)) * 3
            logits = logits.at[:, eos].add(4.0)  # end as soon as the automaton allows it
            token = jax.random.categorical(k, constraints.mask_logits(logits, state, table, constrained))
            token = jnp.where(done, eos, token).astype(jnp.int32)
            return (constraints.advance(state, token, table, constrained & ~done), done | (token == eos)), token

        (state, done), tokens = jax.lax.scan(step, (start, jnp.zeros(batch, bool)), jax.random.split(key, steps))
        return state, done, tokens.T

    state, done, tokens = map(np.asarray, decode(jax.random.key(0), constrained))
    free = np.asarray(decode(jax.random.key(0), jnp.zeros(batch, bool))[2])
    np.testing.assert_array_equal(tokens[which == 3], free[which == 3])
    tb = demo.token_bytes()
    assert done[which < 3].all()
    for row in np.flatnonzero(which < 3):
        ids = list(tokens[row])
        text = b"".join(tb[t] for t in ids[:ids.index(eos)]).decode("utf-8")
        assert np.asarray(table.accepting)[state[row]]
        if which[row] == 0:
            jsonschema.validate(json.loads(text), SCHEMA)
        elif which[row] == 1:
            assert re.fullmatch(REGEX, text), text
        else:
            assert text in CHOICES


def test_pack_refuses_what_does_not_fit(packed):
    autos = packed[0]
    with pytest.raises(ValueError, match="states together"):
        constraints.pack(autos, max_states=100, max_classes=128, max_automata=4)
    with pytest.raises(ValueError, match="token classes"):
        constraints.pack(autos, max_states=2048, max_classes=8, max_automata=4)
    with pytest.raises(ValueError, match="3 automata"):
        constraints.pack(autos, max_states=2048, max_classes=128, max_automata=2)


def test_table_is_far_smaller_than_dense(demo):
    auto = compile_constraint("json_schema", SCHEMA, demo)
    assert auto.nbytes * 10 < auto.num_states * auto.vocab_size * 4


def test_the_engines_sampler_only_picks_allowed_tokens(demo, packed):
    """-inf logits through temperature, top-k and top-p (model.sampling.sample) never come out."""
    from model.sampling import sample

    autos, table, offsets = packed
    batch = 8
    state = jnp.asarray([offsets[i % 3] for i in range(batch)])
    logits = jax.random.normal(jax.random.key(2), (batch, demo.vocab_size)) * 5
    masked = constraints.mask_logits(logits, state, table, jnp.ones(batch, bool))
    allowed = np.asarray(constraints.allowed_mask(state, table))
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5000, 1.0), (1.5, 0, 0.9)):
        for seed in range(5):
            token = np.asarray(jax.jit(sample)(masked, jnp.full(batch, temperature), jnp.full(batch, top_k, jnp.int32),
                                      jnp.full(batch, top_p), jnp.full(batch, seed, jnp.uint32),
                                      jnp.zeros(batch, jnp.int32)))
            assert allowed[np.arange(batch), token].all(), (temperature, top_k, top_p, seed)
