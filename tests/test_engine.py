"""Engine behaviour: sampling, stopping, slot reuse, compile counts, bad input."""

import jax
import numpy as np
import pytest

from model import Engine, SamplingParams
from model.kv_cache import chunk_sizes

rng = np.random.default_rng(0)
PROMPTS = [rng.integers(3, 256, size=n).tolist() for n in (3, 9, 17, 30, 5, 60)]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=128,
                                  seed=1)


def greedy(n=16, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def test_outputs_in_input_order_and_independent_of_batching(engine):
    together = engine.generate(PROMPTS, greedy())
    alone = [engine.generate([p], greedy())[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 16 and o.finish_reason == "length" for o in together)
    assert [o.prompt_len for o in together] == [len(p) for p in PROMPTS]


def test_top_k_1_equals_greedy(engine):
    sampled = engine.generate(PROMPTS, greedy(temperature=1.3, top_k=1, seed=5))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in engine.generate(PROMPTS, greedy())]


def test_tiny_top_p_equals_greedy(engine):
    sampled = engine.generate(PROMPTS[:3], greedy(temperature=0.8, top_p=1e-6, seed=5))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in engine.generate(PROMPTS[:3], greedy())]


def test_seeded_row_does_not_depend_on_batch_mates(engine):
    target = greedy(24, temperature=1.0, seed=1234)
    alone = engine.generate([PROMPTS[1]], target)[0].token_ids
    mates = [greedy(8), greedy(30, temperature=0.7, top_k=20, seed=9), greedy(3, temperature=2.0, seed=1)]
    mixed = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2]], [mates[0], target] + mates[1:])
    assert mixed[1].token_ids == alone
    # and sampling is really sampling: other seeds give other tokens
    others = {tuple(engine.generate([PROMPTS[1]], greedy(24, temperature=1.0, seed=s))[0].token_ids)
              for s in range(4)}
    assert len(others) > 1


def test_mixed_settings_in_one_batch_match_each_alone(engine):
    params = [greedy(10), greedy(12, temperature=0.9, top_p=0.9, seed=3), greedy(7, top_k=5, temperature=1.0, seed=4)]
    mixed = engine.generate(PROMPTS[:3], params)
    assert [o.token_ids for o in mixed] == [engine.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    assert [len(o.token_ids) for o in mixed] == [10, 12, 7]


def test_stop_token_ends_generation_and_is_included(engine):
    ref = engine.generate([PROMPTS[2]], greedy(20))[0].token_ids
    stop = ref[5]
    first = ref.index(stop)
    out = engine.generate([PROMPTS[2]], greedy(20, stop_token_ids=(stop,)))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(engine):
    ref = engine.generate([PROMPTS[3]], greedy(20))[0].token_ids
    eos_engine = Engine(engine.cfg.__class__(**{**engine.cfg.__dict__, "eos_token_ids": (ref[3],)}),
                        engine.weights(), engine.mesh, max_slots=2, max_len=128)
    out = eos_engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=20))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[3]) + 1]
    assert eos_engine.generate([PROMPTS[3]], greedy(20))[0].token_ids == ref


def test_max_len_caps_prompt_plus_completion(engine):
    prompt = rng.integers(3, 256, size=120).tolist()
    out = engine.generate([prompt], greedy(50))[0]
    assert len(prompt) + len(out.token_ids) == 128 and out.finish_reason == "length"


def test_slots_are_reused_when_sequences_end_at_different_steps():
    """More prompts than slots, every sequence ending at a different step: outputs equal one-at-a-time."""
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64,
                                 decode_steps=4, seed=1)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (4, 11, 2, 7, 13, 5, 9)]
    params = [greedy(n) for n in (1, 9, 3, 14, 6, 2, 11)]
    together = eng.generate(prompts, params)
    assert [len(o.token_ids) for o in together] == [1, 9, 3, 14, 6, 2, 11]
    for p, sp, out in zip(prompts, params, together):
        assert out.token_ids == eng.generate([p], sp)[0].token_ids


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_static_waves_give_the_same_outputs_as_inflight():
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (4, 11, 2, 7, 13, 5, 9)]
    params = [greedy(n) if n % 2 else greedy(n, temperature=0.8, seed=n) for n in (1, 9, 3, 14, 6, 2, 11)]
    outs = {}
    for mode, order in (("inflight", "longest_first"), ("inflight", "arrival"), ("static", "arrival")):
        eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=3, max_len=64,
                                     decode_steps=2, seed=1, batching=mode, order=order)
        outs[mode, order] = [o.token_ids for o in eng.generate(prompts, params)]
    assert outs["inflight", "longest_first"] == outs["inflight", "arrival"] == outs["static", "arrival"]


def test_longest_first_starts_the_long_sequence_at_once():
    """Six short sequences and one long one on two slots: started last, the long one runs alone
    at the end; started first, the short ones share the other slot meanwhile."""
    prompts = [rng.integers(3, 256, size=5).tolist() for _ in range(7)]
    params = [greedy(3)] * 6 + [greedy(21)]
    steps = {}
    for order in ("arrival", "longest_first"):
        eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64,
                                     decode_steps=2, seed=1, order=order)
        decode, calls = eng._decode, []
        eng._decode = lambda *a, decode=decode, calls=calls: calls.append(1) or decode(*a)
        eng.generate(prompts, params)
        steps[order] = len(calls)
    assert steps["longest_first"] <= 11 < steps["arrival"], steps


def test_a_slot_is_refilled_within_the_dispatch_its_sequence_ends_in():
    """Two slots: A (3 tokens) ends within the first decode dispatch, C (5 tokens) within the
    second. B waits for a slot; it is prefilled into A's as soon as that first dispatch is queued
    (A's end is certain from its length), so B decodes beside C in the second dispatch: two
    dispatches in all, not a third one for B alone once A's end has been read back."""
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64,
                                 decode_steps=2, seed=1, order="arrival")
    prompts = [rng.integers(3, 256, size=5).tolist() for _ in range(3)]
    params = [greedy(3), greedy(5), greedy(3)]
    alone = [eng.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    before = eng.stats()["decode_calls"]
    outs = eng.generate(prompts, params)
    assert eng.stats()["decode_calls"] - before == 2
    assert [o.token_ids for o in outs] == alone and [len(t) for t in alone] == [3, 5, 3]


def test_a_waiting_short_request_ages_ahead_of_a_later_calls_long_one():
    """One slot. Call 1 holds A (12 tokens) and B (2); longest first, A runs, B waits. Call 2,
    C (10 tokens), arrives once A has 9 tokens, 8 or more decode steps later. Ranked by length
    alone C would pass B; aged by the steps B has waited, B goes first, so a caller waiting on
    its whole call gets it back instead of waiting on every later call's long requests."""
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=1, max_len=64,
                                 decode_steps=2, seed=1)
    prompts = [rng.integers(3, 256, size=5).tolist() for _ in range(3)]
    started, a_tokens, later = [], [], []  # started: the requests in the order their first tokens came

    def on_tokens(i, tokens):
        if i not in started:
            started.append(i)
        if i == 0:
            a_tokens.extend(tokens)
            if len(a_tokens) >= 9 and not later:
                later.extend(eng.submit([prompts[2]], greedy(10), on_tokens=lambda _, t: on_tokens(2, t)))

    first = eng.submit(prompts[:2], [greedy(12), greedy(2)], on_tokens=on_tokens)
    outs = [f.result() for f in first] + [later[0].result()]
    assert [len(o.token_ids) for o in outs] == [12, 2, 10]
    assert started == [0, 1, 2]


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_compiles_once_per_prefill_shape_plus_one_decode():
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=8, max_len=128)
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(1, 120, size=50)]
    sampling = [greedy(int(n), temperature=float(t), seed=i) for i, (n, t) in
                enumerate(zip(rng.integers(1, 20, size=50), rng.choice([0.0, 0.7, 1.0], size=50)))]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    eng.generate(prompts, sampling)
    assert compiles, "the listener sees compilations"
    shapes = sum(len(eng.prefill_rows(b)) for b in {eng._bucket(len(p)) for p in prompts})
    assert eng.compile_counts["prefill"] <= shapes  # (length bucket, power-of-two rows) pairs
    assert eng.compile_counts["decode"] == 1
    before = dict(eng.compile_counts)
    compiles.clear()
    eng.generate(prompts, sampling)
    assert dict(eng.compile_counts) == before
    assert compiles == [], "a second run of the same workload must not compile anything"


@pytest.mark.parametrize("prompts,match", [
    ([[]], "prompt 0 is empty"),
    ([[5, 6], list(range(3, 131))], "prompt 1 has 128 tokens; max_len is 128"),
    ([[5, 300]], "token id 300 outside the vocabulary"),
    ([[5, -1]], "token id -1 outside the vocabulary"),
    ("hello", "list of token-id lists"),
    ([], "prompts is empty"),
    (["hello"], "prompt 0 is a str"),
])
def test_bad_prompts_raise_value_error_naming_the_value(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, greedy())


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(seed=-1), "seed=-1"),
])
def test_bad_sampling_params_raise_value_error_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bad_stop_token_and_param_count(engine):
    with pytest.raises(ValueError, match="stop token id 999"):
        engine.generate([[5, 6]], greedy(stop_token_ids=(999,)))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[5, 6]], [greedy(), greedy()])


def test_many_stop_ids_widen_without_error(engine):
    ref = engine.generate([PROMPTS[0]], greedy(10))[0].token_ids
    stops = tuple(range(200, 220)) + (ref[4],)
    out = engine.generate([PROMPTS[0]], greedy(10, stop_token_ids=stops))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in stops


def test_unknown_preset_or_path():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        Engine.from_pretrained("no-such-model")
    with pytest.raises(ValueError, match="quantize='int4'; expected None or 'int8'"):
        Engine.from_pretrained("tiny-llama", quantize="int4")
    with pytest.raises(ValueError, match="max_len=4096 exceeds"):
        Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), max_len=4096)


def test_warmup_compiles_everything_a_mixed_workload_needs():
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=64)
    eng.warmup()
    assert eng.compile_counts["prefill"] == sum(len(eng.prefill_rows(b)) for b in eng.buckets)
    assert eng.compile_counts["decode"] == 1
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(1, 63, size=30)]
    sampling = [greedy(int(n), temperature=float(t), top_k=int(k), seed=i) for i, (n, t, k) in enumerate(
        zip(rng.integers(1, 30, size=30), rng.choice([0.0, 0.9], size=30), rng.choice([0, 5], size=30)))]
    outs = eng.generate(prompts, sampling)
    assert compiles == [] and [len(o.token_ids) for o in outs] == [sp.max_new_tokens if len(p) + sp.max_new_tokens <= 64
                                                                   else 64 - len(p) for p, sp in zip(prompts, sampling)]


def test_logprobs_are_the_full_forward_log_softmax_of_each_chosen_token(engine):
    params = [greedy(12), greedy(12, temperature=1.5, top_k=7, seed=3)]
    outs = engine.generate(PROMPTS[:2], params)
    for p, o in zip(PROMPTS, outs):
        assert len(o.logprobs) == len(o.token_ids)
        logits = engine.logits([p + o.token_ids])[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = [logp[len(p) - 1 + i, t] for i, t in enumerate(o.token_ids)]
        np.testing.assert_allclose(o.logprobs, expected, atol=2e-4)
    assert max(outs[1].logprobs) < 0 and np.mean(outs[1].logprobs) < np.mean(outs[0].logprobs)


def test_chunk_sizes_cover_max_len_in_at_most_eight_chunks():
    assert chunk_sizes(64) == [64] and chunk_sizes(300) == [100, 100, 100]
    assert chunk_sizes(2048) == [256] * 8 and chunk_sizes(1000) == [125] * 8
    for n in (2, 129, 1023, 4096, 5000):
        sizes = chunk_sizes(n)
        assert sum(sizes) == n and len(sizes) <= 8 and min(sizes) > 0


def test_decode_over_live_chunks_matches_the_full_forward_across_chunk_boundaries():
    """A cache of three chunks; decode attends over only the chunks the running rows reach, so
    a short workload compiles a one-chunk decode and a long one a three-chunk decode. Tokens and
    their log-probabilities equal the full forward's, across the chunk boundaries."""
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=3, max_len=384, seed=1)
    assert eng.cache.sizes == [128, 128, 128]
    eng.generate([PROMPTS[0]], greedy(10))
    assert eng.compile_counts["decode"] == 1
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (120, 5, 250)]
    params = [greedy(30), greedy(30, temperature=1.0, seed=2), greedy(30)]
    outs = eng.generate(prompts, params)
    assert eng.compile_counts["decode"] == 2
    for p, o in zip(prompts, outs):
        logits = eng.logits([p + o.token_ids])[0][len(p) - 1:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        np.testing.assert_allclose(o.logprobs, logp[np.arange(30), o.token_ids], atol=2e-4)
    assert [o.token_ids for i, o in enumerate(outs) if i != 1] == [
        np.argmax(eng.logits([p + o.token_ids])[0][len(p) - 1:-1], -1).tolist()
        for i, (p, o) in enumerate(zip(prompts, outs)) if i != 1]


@pytest.mark.slow  # test_warmup_compiles_everything_a_mixed_workload_needs covers warm-up in the default run
def test_warmup_compiles_a_decode_per_live_chunk_count():
    eng = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=256, seed=1)
    report = eng.warmup()
    assert eng.compile_counts["decode"] == len(eng.cache.sizes) == 2
    assert report["functions"] == len(eng.warmup_functions()) == len(eng.prefill_shapes()) + 2 + 2  # rows 1, 2
    assert report["compile_s"] > 0
    before, stats = dict(eng.compile_counts), eng.stats()
    assert stats["compile_s"] > 0 and stats["compiled_functions"] == report["functions"]
    eng.generate([rng.integers(3, 256, size=n).tolist() for n in (3, 200, 90)], greedy(40))
    assert dict(eng.compile_counts) == before
    after = eng.stats()  # nothing compiled while generating: its time is prefill and decode
    assert after["compile_s"] == stats["compile_s"] and after["prefill_s"] > stats["prefill_s"]
    assert after["decode_s"] > stats["decode_s"] and after["decode_calls"] > stats["decode_calls"]


# ------------------------------------------------------------------ the scheduler loop


def test_threads_share_the_slots_and_get_what_each_would_alone(engine):
    import threading

    expected = [o.token_ids for o in engine.generate(PROMPTS, greedy(12))]
    got, threads = {}, []
    for i, p in enumerate(PROMPTS):
        threads.append(threading.Thread(target=lambda i=i, p=p: got.__setitem__(i, engine.generate([p], greedy(12)))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i][0].token_ids for i in range(len(PROMPTS))] == expected


def test_submit_returns_futures_and_bad_input_raises_before_anything_is_queued(engine):
    futures = engine.submit(PROMPTS[:2], greedy(5))
    assert [len(f.result(60).token_ids) for f in futures] == [5, 5]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.submit([PROMPTS[0], []], greedy(5))


def test_a_failed_step_fails_its_sequences_only_and_the_loop_keeps_serving(engine, monkeypatch):
    import time

    expected = engine.generate([PROMPTS[2]], greedy(6))[0].token_ids
    real = engine._decode
    calls = []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return real(*args)

    monkeypatch.setattr(engine, "_decode", broken_once)
    [doomed] = engine.submit([PROMPTS[0]], greedy(20))
    with pytest.raises(RuntimeError, match="device fell over"):
        doomed.result(60)
    assert engine.generate([PROMPTS[2]], greedy(6))[0].token_ids == expected
    deadline = time.monotonic() + 10
    while engine._thread is not None and time.monotonic() < deadline:  # an idle engine holds no thread
        time.sleep(0.01)
    assert engine._thread is None


def test_max_slots_auto_fills_the_memory_left_after_the_weights():
    from model.config import PRESETS
    from model.sharding import bytes_per_device, make_mesh

    cfg, mesh, hbm = PRESETS["tiny-llama"], make_mesh((2, 4)), 8 * 2**20
    eng = Engine.abstract(cfg, mesh, dtype="float32", max_slots="auto", max_len=128, hbm_bytes=hbm)
    weights, cache = bytes_per_device(eng.params), bytes_per_device(eng.cache)
    per_pair = cache / (eng.max_slots // 2)  # slots are split over 'data' (2): a pair costs each device one
    assert eng.max_slots % 2 == 0 and eng.max_slots > 2
    assert weights + cache <= 0.9 * hbm < weights + cache + per_pair
    half = Engine.abstract(cfg, mesh, dtype="float32", max_slots="auto", max_len=128, hbm_bytes=hbm,
                           hbm_utilization=0.45)
    assert half.max_slots < eng.max_slots
    with pytest.raises(ValueError, match="no room for a cache slot"):
        Engine.abstract(cfg, mesh, dtype="float32", max_slots="auto", max_len=128, hbm_bytes=weights)
    with pytest.raises(ValueError, match="cpu devices do not report one"):
        Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots="auto", max_len=64)


def test_the_handler_retries_each_request_of_a_failed_step_alone():
    """A failed device step fails every sequence it held; the job's handler resubmits each alone,
    so only the request that breaks the engine ends as generation_failed."""
    import concurrent.futures

    from model import GenerationOutput
    from pipeline.handler import EngineHandler, ModelSpec
    from pipeline.records import Request

    class Breaks:  # any step holding token 666 fails, and takes its batch mates down with it
        def submit(self, prompts, params):
            out = []
            for p in prompts:
                f = concurrent.futures.Future()
                if any(666 in q for q in prompts):
                    f.set_exception(RuntimeError("step failed"))
                else:
                    f.set_result(GenerationOutput([7, 8], "length", len(p)))
                out.append(f)
            return out

    reqs = [Request(id=str(i), shard=0, line=i, prompt="p", max_tokens=2, max_tokens_given=False, temperature=0.0,
                    top_p=1.0, top_k=0, seed=0, token_ids=ids) for i, ids in enumerate([[1, 5], [1, 666], [1, 9]])]
    results = EngineHandler(ModelSpec())._generate(reqs, Breaks())
    assert [r.error_type for r in results] == [None, "generation_failed", None]
    assert results[0].token_ids == [7, 8] and "step failed" in results[1].error
