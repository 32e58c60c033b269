"""Chunked prefill: long prompts go in pieces between decode dispatches, within a token budget per
step, and every output is what whole-prompt prefill gives."""

import jax
import numpy as np
import pytest

from model import Engine, SamplingParams
from model.tokenizer import decode_completions

rng = np.random.default_rng(5)
SHARED = rng.integers(3, 256, size=70).tolist()  # a prefix two prompts share (prefix cache: 4 blocks of 16)
# three short prompts, then long ones: 200 and 130 tokens are 7 and 5 pieces of 32
PROMPTS = [rng.integers(3, 256, size=n).tolist() for n in (5, 12, 8, 200, 130)] + [SHARED + [9] * 60, SHARED + [4, 4]]
GREEDY = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (30, 4, 6, 6, 8, 7, 10)]


def make(chunk, path="cpu", **kw):
    return Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=3, max_len=256,
                                  decode_steps=2, seed=4, prefill_chunk=chunk, hot_path=path, **kw)


@pytest.fixture(scope="module")
def whole():
    """Whole-prompt prefill (chunking off): the reference."""
    return make(None).generate(PROMPTS, GREEDY)


def same(outs, ref):
    """Token-identical, and log-probabilities equal to float rounding."""
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in outs]),
                               np.concatenate([o.logprobs for o in ref]), atol=1e-5)


@pytest.mark.parametrize("path,kw", [
    ("cpu", {}),
    ("cpu", {"prefix_cache_entries": 2, "prefix_block": 16}),
    ("cpu", {"batching": "static", "order": "arrival"}),
    ("cpu", {"order": "arrival"}),
    ("tpu", {"prefix_cache_entries": 2, "prefix_block": 16}),  # stacked cache, Pallas kernel interpreted
])
def test_chunked_outputs_equal_whole_prompt_prefill(whole, path, kw):
    engine = make(32, path, **kw)
    assert engine.piece_len == 32
    same(engine.generate(PROMPTS, GREEDY), whole)
    if kw.get("prefix_cache_entries"):  # the shared prefix was cached after its prompt's last piece
        assert engine.prefix_cache.stats.tokens_reused >= 64


def test_running_rows_decode_between_the_pieces_of_a_long_prompt(whole):
    """The three short prompts take the three slots; when one ends, the 200-token prompt takes its
    slot while the others decode. It goes in 7 pieces, one per step, with a decode dispatch
    between every two, and no step spends more than the 32-token budget on prefill while rows
    decode."""
    engine = make(32, order="arrival")
    events = []
    call_prefill, decode = engine._call_prefill, engine._decode

    def prefill(tokens, starts, lengths, slots, final, rows):
        decoding = any(q is not None and q.decoding for q in engine._slot_of)
        real = slots < engine.max_slots
        events.append(("prefill", tokens.size * decoding, list(zip(lengths[real], final[real]))))
        return call_prefill(tokens, starts, lengths, slots, final, rows)

    engine._call_prefill = prefill
    engine._decode = lambda *a: events.append(("decode",)) or decode(*a)
    same(engine.generate(PROMPTS[:4], GREEDY[:4]), whole[:4])
    pieces = [i for i, e in enumerate(events) if e[0] == "prefill" and e[2][0][0] > 16]
    assert [events[i][2] for i in pieces] == [[(n, n == 200)] for n in (32, 64, 96, 128, 160, 192, 200)]
    assert all(("decode",) in events[a:b] for a, b in zip(pieces, pieces[1:]))
    spent = 0
    for e in events:
        spent = 0 if e[0] == "decode" else spent + e[1]  # prefill tokens since the last decode, while rows decode
        assert spent <= 32


def test_a_mid_prefill_sequence_fails_with_its_step(whole):
    engine = make(32, order="arrival")
    decode = engine._decode

    def broken(*a):
        if any(q is not None and not q.decoding for q in engine._slot_of):
            raise RuntimeError("device fell over")
        return decode(*a)

    engine._decode = broken
    futures = engine.submit(PROMPTS[:4], GREEDY[:4])
    for f in (futures[0], futures[3]):  # decoding, and mid-prefill, when the step failed
        with pytest.raises(RuntimeError, match="device fell over"):
            f.result(60)
    engine._decode = decode
    same(engine.generate(PROMPTS[:4], GREEDY[:4]), whole[:4])


def test_warmup_compiles_buckets_up_to_a_piece_and_nothing_compiles_later(whole):
    engine = make(64)
    # the CPU path's buckets up to the 64-token piece, not 80 .. 256
    assert {t for _, t in engine.prefill_shapes()} == {16, 24, 32, 40, 48, 56, 64}
    engine.warmup()
    assert engine.compile_counts["prefill"] == len(engine.prefill_shapes())
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    same(engine.generate(PROMPTS, GREEDY), whole)
    assert compiles == []


def test_a_stop_string_ends_a_chunked_prompt_early():
    engine = Engine.from_pretrained("demo", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=256,
                                    prefill_chunk=16)
    ids = engine.tokenizer.encode_batch(["In the beginning " * 20, "Once upon a time"])
    assert len(ids[0]) > 48
    full = engine.generate(ids, SamplingParams(max_new_tokens=40, ignore_eos=True))
    text = decode_completions(engine.tokenizer, ids[:1], [full[0].token_ids])[0]
    stop = text[len(text) // 3:len(text) // 3 + 4]
    early = engine.generate(ids, [SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,)),
                                  SamplingParams(max_new_tokens=40, ignore_eos=True)])
    assert early[0].finish_reason == "stop" and len(early[0].token_ids) < 40
    assert early[0].token_ids == full[0].token_ids[:len(early[0].token_ids)]
    assert early[1].token_ids == full[1].token_ids
