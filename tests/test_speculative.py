"""Speculative decoding by prompt lookup: proposals, exact verification (greedy tokens identical,
sampled tokens distributed as the target's), and the engine's speculative dispatch beside plain
decoding's features (stop tokens, length limits, constraints, top logprobs, chunked prefill)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import Engine, EngineConfig, SamplingParams
from model.config import llama_preset
from model.constraints import TokenAutomaton
from model.engine import SpecGate, random_params
from model.sampling import filtered_logits
from model.speculative import ngram_propose, verify


def test_prompt_lookup_proposes_what_followed_the_longest_latest_match():
    #            0  1  2  3  4  5  6  7  8  9 10
    history = [[5, 6, 7, 8, 9, 1, 6, 7, 3, 6, 7],   # suffix (6, 7): latest match ends at 7 -> 3, 6, 7
               [1, 2, 3, 4, 2, 3, 9, 9, 9, 9, 2],   # only (2,) matches, below n_min 2 -> nothing
               [4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0]]   # (4, 4, 4) ends at 3 -> one token known (4)
    history = jnp.asarray(history, jnp.int32)
    proposals, count = ngram_propose(history, jnp.asarray([10, 10, 4]), k=4, n_max=3, n_min=2)
    assert count.tolist() == [3, 0, 1]
    assert proposals[0, :3].tolist() == [3, 6, 7]
    assert proposals[2, 0] == 4
    # a longer match wins over a later shorter one
    h = jnp.asarray([[1, 2, 3, 8, 0, 2, 3, 5, 1, 2, 3]], jnp.int32)
    proposals, count = ngram_propose(h, jnp.asarray([10]), k=2, n_max=3, n_min=1)
    assert count.tolist() == [2] and proposals[0].tolist() == [8, 0]


def _chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """p-value of samples (token ids) against probs over the tokens with expected count >= 5
    (the rest pooled into one cell)."""
    n = len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs.astype(np.float64) / probs.sum() * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_verification_samples_the_targets_distribution(temperature, top_k, top_p):
    """Rejection sampling against deterministic proposals: the first token follows p_0, and the
    second, among rows that kept the first proposal, follows p_1, whatever was proposed."""
    n, v = 40_000, 12
    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.broadcast_to(rng.normal(0, 1.5, (1, 3, v)), (n, 3, v)), jnp.float32)
    rows = lambda x: jnp.full((n,), x)  # noqa: E731
    p = np.asarray(jax.nn.softmax(filtered_logits(logits[0], jnp.full((3,), temperature), jnp.full((3,), top_k),
                                                  jnp.full((3,), top_p)), axis=-1))
    proposals = jnp.asarray(np.broadcast_to([int(np.argsort(p[0])[-2]), int(np.argmax(p[1]))], (n, 2)), jnp.int32)
    tokens, accepted = verify(logits, proposals, rows(2), rows(temperature), rows(top_k), rows(top_p),
                              jnp.arange(n, dtype=jnp.uint32), rows(3))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    assert _chi_square_p(tokens[:, 0], p[0]) > 1e-3
    kept = accepted >= 1
    assert 0.05 < kept.mean() < 0.95
    assert _chi_square_p(tokens[kept, 1], p[1]) > 1e-3
    # tokens outside the top-k / top-p set never appear
    assert np.all(p[0][tokens[:, 0]] > 0) and np.all(p[1][tokens[kept, 1]] > 0)


def test_verification_against_a_draft_distribution_samples_the_targets():
    """Proposals drawn from a draft's q, accepted with min(1, p/q), else redrawn from
    max(p - q, 0): the first token follows p_0 and the second, after a kept first, p_1."""
    n, v = 40_000, 10
    rng = np.random.default_rng(2)
    target = jnp.asarray(np.broadcast_to(rng.normal(0, 1.5, (1, 3, v)), (n, 3, v)), jnp.float32)
    logq = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 1.5, (1, 2, v)), jnp.float32), axis=-1)
    keys = jax.random.split(jax.random.key(0), n)
    proposals = jax.vmap(lambda key: jax.random.categorical(key, logq[0]))(keys).astype(jnp.int32)  # [n, 2]
    rows = lambda x: jnp.full((n,), x)  # noqa: E731
    tokens, accepted = verify(target, proposals, rows(2), rows(1.0), rows(0), rows(1.0),
                              jnp.arange(n, dtype=jnp.uint32), rows(0), jnp.broadcast_to(logq, (n, 2, v)))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    p = np.asarray(jax.nn.softmax(target[0], axis=-1))
    assert _chi_square_p(tokens[:, 0], p[0]) > 1e-3
    kept = accepted >= 1
    assert 0.05 < kept.mean() < 0.95
    assert _chi_square_p(tokens[kept, 1], p[1]) > 1e-3
    # the acceptance rate is sum_x min(p, q)
    np.testing.assert_allclose(kept.mean(), np.minimum(p[0], np.exp(np.asarray(logq[0, 0]))).sum(), atol=0.01)


def test_filtered_logits_are_the_same_through_candidates_and_through_the_exact_fallback():
    logits = jnp.asarray(np.random.default_rng(3).normal(0, 2, (4, 50)), jnp.float32)
    t, k, p = jnp.asarray([0.7, 1.0, 1.3, 0.0]), jnp.asarray([0, 7, 0, 0]), jnp.asarray([0.95, 1.0, 0.5, 1.0])
    exact = filtered_logits(logits, t, k, p, candidates=50)  # every set within the candidates
    narrow = filtered_logits(logits, t, k, p, candidates=4)  # row 0's nucleus is wider: the exact fallback
    np.testing.assert_allclose(np.asarray(narrow), np.asarray(exact), rtol=1e-6)
    finite = np.isfinite(np.asarray(exact)).sum(axis=1)
    assert finite[1] == 7 and finite[3] == 1 and 1 <= finite[2] < 50  # top-k 7; greedy one-hot; a nucleus


def test_greedy_verification_keeps_proposals_while_they_equal_the_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 9)), jnp.float32)
    best = np.argmax(np.asarray(logits), axis=-1)
    proposals = jnp.asarray([[best[0, 0], best[0, 1], (best[0, 2] + 1) % 9], best[1, :3]], jnp.int32)
    tokens, accepted = verify(logits, proposals, jnp.asarray([3, 1]), jnp.zeros(2), jnp.zeros(2, jnp.int32),
                              jnp.ones(2), jnp.zeros(2, jnp.uint32), jnp.zeros(2, jnp.int32))
    assert np.asarray(accepted).tolist() == [2, 1]  # row 1: only one proposal is real
    assert np.asarray(tokens).tolist() == best.tolist()


def test_the_gate_turns_speculation_off_while_it_does_not_pay_and_probes_with_backoff():
    gate = SpecGate(cost=2.0)
    assert gate.speculate()
    gate.record(kept=10, row_steps=100)  # 1.1 tokens per step for the cost of 2: off
    pattern = [gate.speculate() for _ in range(2)]
    assert pattern == [False, True]  # one plain dispatch, then a probe
    gate.record(kept=10, row_steps=100)
    assert [gate.speculate() for _ in range(3)] == [False, False, True]  # the wait doubled
    gate.record(kept=400, row_steps=100)  # accepting again: on, backoff reset
    assert gate.speculate() and gate.backoff == 1


def test_bad_speculative_configs_name_the_value():
    with pytest.raises(ValueError, match="speculative='eagle'"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min=4 exceeds prompt_lookup_max=3"):
        EngineConfig(speculative="ngram", prompt_lookup_min=4)


# ---------------------------------------------------------------- the engine

# prompts that repeat themselves, so that lookup finds matches
PROMPTS = [[1] + [10, 11, 12, 13, 14] * 4, [1, 40, 41, 42, 40, 41], list(range(60, 90)) + list(range(60, 70)),
           [1, 7, 7, 7, 7]]
# a small random draft of tiny-llama's vocabulary: it agrees with the target now and then
SMALL_DRAFT = llama_preset(vocab=256, hidden=32, layers=1, heads=2, kv_heads=1, ffw=64)


def speculative(plain: Engine, how: str, gate: bool = False, **config) -> Engine:
    """plain's model with speculation: "ngram", "draft" (SMALL_DRAFT, random) or "self" (the
    model as its own draft: every greedy proposal is accepted). Without `gate`, it speculates
    at every step, paying or not."""
    if how == "ngram":
        engine = Engine(plain.cfg, plain.weights(), plain.mesh, dataclasses.replace(plain.config, speculative="ngram",
                                                                                    **config))
    else:
        draft = (plain.cfg, plain.weights()) if how == "self" else (
            SMALL_DRAFT, random_params(SMALL_DRAFT, jnp.float32, plain.mesh, seed=7))
        engine = Engine(plain.cfg, plain.weights(), plain.mesh, dataclasses.replace(plain.config, draft=how, **config),
                        draft=draft)
    if not gate:
        engine._gate.cost = 0.0
    return engine


@pytest.fixture(scope="module")
def plain():
    return Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=128,
                                  seed=3)


@pytest.fixture(scope="module", params=["ngram", "draft"])
def engines(request, plain):
    return plain, speculative(plain, request.param)


def _same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)


@pytest.mark.parametrize("how", ["ngram", "draft", pytest.param("self", marks=pytest.mark.slow)])
def test_greedy_tokens_equal_plain_decoding_and_proposals_are_kept(plain, how):
    spec = speculative(plain, how)
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    outs = spec.generate(PROMPTS * 2, sp)
    _same(plain.generate(PROMPTS * 2, sp), outs)
    assert sum(o.proposed_tokens for o in outs) > 0
    assert all(o.accepted_tokens <= o.proposed_tokens for o in outs)
    if spec.config.draft != "draft":  # a random draft's greedy proposals are rarely the model's
        assert sum(o.accepted_tokens for o in outs) > 0
    stats = spec.stats()
    assert stats["spec_accepted"] >= sum(o.accepted_tokens for o in outs)
    assert spec.compile_counts["verify"] >= 1
    if spec.config.draft == "self":  # the model proposing its own greedy tokens: all kept but the length cut
        assert all(o.accepted_tokens >= o.proposed_tokens - spec.spec_k for o in outs)


@pytest.mark.parametrize("limit", [1, 3])
def test_length_limits_and_stop_tokens_cut_inside_a_verify_step(engines, limit):
    plain, spec = engines
    ref = plain.generate(PROMPTS, SamplingParams(max_new_tokens=30, ignore_eos=True))
    sps = [SamplingParams(max_new_tokens=limit, ignore_eos=True),
           SamplingParams(max_new_tokens=30, stop_token_ids=(ref[0].token_ids[limit],), ignore_eos=True)]
    for sp in sps:
        _same(plain.generate(PROMPTS, sp), spec.generate(PROMPTS, sp))
    # the end of the cache: prompt + completion reach max_len
    long = [list(range(3, 120))]
    _same(plain.generate(long, SamplingParams(max_new_tokens=30, ignore_eos=True)),
          spec.generate(long, SamplingParams(max_new_tokens=30, ignore_eos=True)))


def test_top_logprobs_and_mixed_greedy_and_sampled_rows(engines):
    plain, spec = engines
    sps = [SamplingParams(max_new_tokens=20, ignore_eos=True, top_logprobs=3),
           SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=0.8, seed=5)] * 2
    a, b = plain.generate(PROMPTS, sps), spec.generate(PROMPTS, sps)
    for i in (0, 2):  # greedy rows beside sampled ones: identical, top logprobs too
        assert a[i].token_ids == b[i].token_ids
        for x, y in zip(a[i].top_logprobs, b[i].top_logprobs):
            assert [t for t, _ in x] == [t for t, _ in y]
            np.testing.assert_allclose([lp for _, lp in x], [lp for _, lp in y], atol=1e-4)
    for i in (1, 3):  # sampled rows: their own draws, each token's logprob the model's
        assert len(b[i].token_ids) == 20
        full = spec.logits([PROMPTS[i] + b[i].token_ids])[0]
        ref = [float(jax.nn.log_softmax(full[len(PROMPTS[i]) - 1 + j])[t]) for j, t in enumerate(b[i].token_ids)]
        np.testing.assert_allclose(b[i].logprobs, ref, atol=1e-4)


@pytest.mark.parametrize("how", ["ngram", pytest.param("draft", marks=pytest.mark.slow)])
def test_sampled_tokens_follow_the_models_distribution_end_to_end(plain, how):
    """The second token (the first a verify step decides) over many seeds, against the model's
    own probabilities given the prompt and the first token."""
    spec = speculative(plain, how, prompt_lookup_min=1)
    prompt = [1] + list(range(3, 120))  # most first tokens occur in it: lookup proposes the one after
    n = 800
    outs = spec.generate([prompt] * n, [SamplingParams(max_new_tokens=2, temperature=1.0, top_k=4, seed=s,
                                                       ignore_eos=True) for s in range(n)])
    assert sum(o.proposed_tokens for o in outs) > n / 4  # (mostly rejected: the accept path is tested above)
    firsts = sorted({o.token_ids[0] for o in outs})
    full = spec.logits([prompt + [t] for t in firsts])
    tested = 0
    for t, logits in zip(firsts, full):
        seconds = np.asarray([o.token_ids[1] for o in outs if o.token_ids[0] == t])
        if len(seconds) < 60:
            continue
        tested += 1
        p = np.asarray(jax.nn.softmax(filtered_logits(jnp.asarray(logits[len(prompt)])[None], jnp.ones(1),
                                                      jnp.full((1,), 4), jnp.ones(1))))[0]
        assert _chi_square_p(seconds, p) > 1e-3
    assert tested >= 2


def test_constrained_rows_decode_one_token_per_step_beside_speculating_rows(engines):
    plain, spec = engines
    # tokens 30..39 only, six of them, then EOS (2): class 0 forbidden, 1 the digits, 2 EOS
    next_state = np.full((7, 3), -1, np.int32)
    next_state[np.arange(6), 1] = np.arange(1, 7)
    next_state[6, 2] = 6
    token_class = np.zeros(256, np.int32)
    token_class[30:40], token_class[2] = 1, 2
    automaton = TokenAutomaton(next_state, token_class, np.arange(7) == 6, "regex", "[0-9]{6}")
    sps = [SamplingParams(max_new_tokens=12, constraint=automaton), SamplingParams(max_new_tokens=24,
                                                                                   ignore_eos=True)] * 2
    a, b = plain.generate(PROMPTS, sps), spec.generate(PROMPTS, sps)
    _same(a, b)
    assert b[0].constraint_satisfied and b[0].proposed_tokens == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ngram", "draft"])
def test_chunked_prefill_and_prefix_cache_keep_history_and_draft_whole(how):
    plain = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=256,
                                   prefill_chunk=64, prefix_cache_entries=4, prefix_block=16, seed=3)
    spec = speculative(plain, "self" if how == "draft" else how)
    shared = list(range(100, 140))
    prompts = [shared + [5, 6, 7] * 30, shared + [8, 9] * 10, [1] + shared * 3]
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    _same(plain.generate(prompts, sp), spec.generate(prompts, sp))
    outs = spec.generate(prompts, sp)  # again, the prefix now cached (the draft's rows too)
    _same(plain.generate(prompts, sp), outs)
    assert spec.prefix_cache.stats.hits > 0
    assert sum(o.accepted_tokens for o in outs) > 0
    if how == "draft":  # a draft whose cache missed the prefix would not propose the model's tokens
        assert all(o.accepted_tokens >= o.proposed_tokens - spec.spec_k for o in outs)  # all but the length cut


@pytest.mark.parametrize("hot_path,how", [("gpu", "ngram"), pytest.param("gpu", "draft", marks=pytest.mark.slow),
                                          pytest.param("tpu", "ngram", marks=pytest.mark.slow)])
def test_the_stacked_path_speculates_with_the_same_greedy_tokens(hot_path, how):
    """The TPU/GPU path: stacked weights and caches, ragged attention over k + 1 queries per row
    (its Pallas kernel, interpreted, for "tpu")."""
    plain = Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=128,
                                   seed=3, hot_path=hot_path)
    spec = speculative(plain, how)
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    outs = spec.generate(PROMPTS, sp)
    _same(plain.generate(PROMPTS, sp), outs)
    assert sum(o.proposed_tokens for o in outs) > 0


@pytest.mark.slow
def test_warmup_compiles_the_verify_step_and_measures_its_cost(plain):
    spec = speculative(plain, "ngram", gate=True)
    spec.warmup()
    assert spec.compile_counts["verify"] >= len(spec.cache.sizes)
    assert spec._gate.cost > 0


def test_a_batch_whose_proposals_fail_stops_speculating_with_the_same_tokens(plain):
    """Sampled rows over prompts full of n-gram matches that the model does not follow: the gate
    (its cost measured at the first step) turns speculation off, and probes it rarely."""
    spec = speculative(plain, "ngram", gate=True, prompt_lookup_min=1)
    spec._gate.cost = 1.5  # a verify step costs 1.5 decode steps (set, not measured: a busy host is noisy)
    prompts = [[1] + list(range(3, 60))] * 4
    sps = [SamplingParams(max_new_tokens=64, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)]
    outs = spec.generate(prompts, sps)
    stats = spec.stats()
    assert stats["spec_steps"] > 0 and stats["spec_accepted"] < 0.5 * stats["spec_steps"]  # it tried; no pay
    assert stats["spec_steps"] < 4 * 64 / 2  # always on, ~256 row-steps would verify: most ran plain
    assert all(len(o.token_ids) == 64 for o in outs)


def test_a_bad_draft_is_refused_naming_the_values(plain):
    other_vocab = llama_preset(vocab=128, hidden=32, layers=1, heads=2, kv_heads=1, ffw=64)
    with pytest.raises(ValueError, match="draft vocabulary has 128 tokens; the target's has 256"):
        Engine(plain.cfg, plain.weights(), plain.mesh, dataclasses.replace(plain.config, draft="x"),
               draft=(other_vocab, random_params(other_vocab, jnp.float32, plain.mesh)))
    with pytest.raises(ValueError, match="draft='no/such/dir' is not a checkpoint directory"):
        Engine(plain.cfg, plain.weights(), plain.mesh, dataclasses.replace(plain.config, draft="no/such/dir"))
    with pytest.raises(ValueError, match="speculative='draft' needs `draft`"):
        EngineConfig(speculative="draft")
    with pytest.raises(ValueError, match="with speculative='ngram'"):
        EngineConfig(speculative="ngram", draft="demo-draft")


@pytest.mark.slow
def test_the_demo_draft_keeps_the_demo_models_greedy_tokens():
    plain = Engine.from_pretrained("demo", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=256)
    spec = Engine.from_pretrained("demo", mesh_shape=(1, 1), dtype="float32", max_slots=4, max_len=256,
                                  draft="demo-draft")
    prompts = plain.tokenizer.encode_batch(["The hacker wrote", "And the LORD said unto Moses,", "A kludge is",
                                            "In the beginning"])
    sp = SamplingParams(max_new_tokens=48)
    outs = spec.generate(prompts, sp)
    _same(plain.generate(prompts, sp), outs)
    accepted, proposed = sum(o.accepted_tokens for o in outs), sum(o.proposed_tokens for o in outs)
    assert 0.2 < accepted / proposed < 0.9


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_a_job_speculates_from_its_model_yaml_and_reports_acceptance(tmp_path):
    """`speculative: ngram` in the model YAML: the same completions as without (greedy, float32),
    and the manifest's engine numbers carry the acceptance."""
    import json

    from pipeline.job import run
    (tmp_path / "in").mkdir()
    texts = ["Copy: the cat sat on the mat. Copy: the cat", "And God said, Let there be light: and there was",
             "one two three one two three one two", "The hacker wrote the code and the hacker"]
    (tmp_path / "in" / "p.jsonl").write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n"
                                                     for i, t in enumerate(texts)))
    outs = {}
    for name, extra in (("plain", ""), ("spec", "speculative: ngram\nnum_speculative_tokens: 3\n")):
        (tmp_path / f"{name}.yaml").write_text("checkpoint: demo\ndtype: float32\nmax_len: 128\nmax_slots: 4\n"
                                               "mesh_shape: [1, 1]\n" + extra)
        run(["--input", str(tmp_path / "in" / "*"), "--output", str(tmp_path / name), "--model",
             str(tmp_path / f"{name}.yaml"), "--max_tokens", "48"])
        outs[name] = [json.loads(line)["completion"] for line in (tmp_path / name / "p.jsonl").read_text().splitlines()]
        manifest = json.loads((tmp_path / name / "_manifest.json").read_text())
    assert outs["spec"] == outs["plain"]
    engine = manifest["timings"]["engine"]
    assert engine["spec_steps"] > 0 and 0 < engine["spec_accepted"] <= engine["spec_proposed"]
    assert 0 < engine["spec_acceptance_rate"] <= 1 and engine["spec_mean_accepted"] > 0
