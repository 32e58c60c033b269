"""launch/distill_draft.py and launch/bench_draft.py: distillation, the shipped demo draft, acceptance."""

import dataclasses
import filecmp
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import bench_draft, distill_draft
from launch import train_demo as demo
from model.config import ModelConfig
from model.params import init_params

DEMO = os.path.join(os.path.dirname(__file__), "..", "model", "assets", "demo")
DEMO_DRAFT = os.path.join(os.path.dirname(__file__), "..", "model", "assets", "demo-draft")
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=16, max_position_embeddings=demo.SEQ, tie_word_embeddings=True)
TINY_DRAFT = distill_draft.DraftShape(layers=1, hidden=16, heads=1, kv_heads=1, ffw=32)


def test_distillation_reduces_the_kl_to_a_tiny_random_target():
    # std 0.3: a target with peaked, context-dependent distributions (0.02 gives near-uniform ones)
    target = init_params(TINY, jax.random.key(0), jnp.float32, std=0.3)
    cfg = distill_draft.draft_config(TINY, TINY_DRAFT)
    stream = np.random.default_rng(0).integers(0, TINY.vocab_size, 20_000).astype(np.int32)
    windows = demo.eval_windows(stream, demo.BATCH)
    evaluate = distill_draft.make_eval(cfg, TINY)
    before = distill_draft.evaluate(evaluate, init_params(cfg, jax.random.key(0), jnp.float32), target, windows)
    params = distill_draft.distill(TINY, target, cfg, stream, steps=20, loss="kl", lr=3e-2)
    after = distill_draft.evaluate(evaluate, params, target, windows)
    # 1.28 -> 1.00 nats; a random target is hard to match, the draft's floor is ~0.9
    assert after["kl"] < 0.85 * before["kl"], (before, after)


def test_the_projected_embedding_keeps_the_targets_token_similarities():
    target = init_params(TINY, jax.random.key(0), jnp.float32)
    e = np.asarray(target["embed"], np.float64)
    full = distill_draft.draft_config(TINY, dataclasses.replace(TINY_DRAFT, hidden=TINY.hidden_size, heads=2))
    got = np.asarray(distill_draft.projected_embeddings(init_params(full, jax.random.key(1), jnp.float32), full,
                                                        target)["embed"], np.float64)
    np.testing.assert_allclose(got @ got.T, e @ e.T, atol=1e-6)  # at full width: a rotation of it
    narrow = distill_draft.draft_config(TINY, TINY_DRAFT)
    params = distill_draft.projected_embeddings(init_params(narrow, jax.random.key(1), jnp.float32), narrow, target)
    assert params["embed"].shape == (TINY.vocab_size, TINY_DRAFT.hidden)
    u, s, vt = np.linalg.svd(e, full_matrices=False)  # the best rank-16 approximation's Gram matrix
    best = (u[:, :16] * s[:16]) @ (u[:, :16] * s[:16]).T
    np.testing.assert_allclose(np.asarray(params["embed"], np.float64) @ np.asarray(params["embed"]).T, best,
                               atol=1e-5)


def test_a_draft_with_another_vocabulary_is_refused_naming_both_sizes():
    target = init_params(TINY, jax.random.key(0), jnp.float32)
    cfg = dataclasses.replace(distill_draft.draft_config(TINY, TINY_DRAFT), vocab_size=32)
    stream = np.zeros(1000, np.int32)
    with pytest.raises(ValueError, match="draft vocabulary has 32 tokens; the target's has 64"):
        distill_draft.distill(TINY, target, cfg, stream, steps=1)


def test_the_shipped_demo_draft_loads_in_the_engine_and_in_transformers_with_the_same_logits():
    transformers = pytest.importorskip("transformers")
    import torch

    from model import Engine

    target_cfg, _ = distill_draft.load_target(DEMO)
    engine = Engine.from_pretrained(DEMO_DRAFT, dtype="float32", max_slots=1)
    distill_draft.check_draft(engine.cfg, target_cfg)
    assert target_cfg.num_params >= 3 * engine.cfg.num_params
    assert filecmp.cmp(os.path.join(DEMO, "tokenizer.model"), os.path.join(DEMO_DRAFT, "tokenizer.model"),
                       shallow=False)
    tokens = engine.tokenizer.encode("In the beginning God created the hacker, and the hacker said: ")
    ours = engine.logits([tokens])[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(DEMO_DRAFT, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- acceptance vs brute force

V, K = 3, 3


def toy_model(seed: int, like: int | None = None):
    """A LogitsFn over V tokens whose next-token logits depend on the last two tokens, and the
    same as a plain function of a token list. like: the model of that seed plus noise (a draft
    that often agrees with it)."""
    def tables(s):
        rng = np.random.default_rng(s)
        return 2.0 * rng.normal(size=(V, V)), 2.0 * rng.normal(size=(V, V))
    last, prev = tables(seed)
    if like is not None:
        base = tables(like)
        last, prev = base[0] + 0.7 * last, base[1] + 0.7 * prev

    def of_list(tokens):
        return last[tokens[-1]] + prev[tokens[-2]]

    def fn(tokens, index):
        rows = np.arange(len(tokens))
        return last[tokens[rows, index]] + prev[tokens[rows, index - 1]]
    return fn, of_list


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


CONTEXTS = [[0, 1], [2, 2, 0], [1, 0, 2, 1], [0, 0], [2, 1, 1]]


def as_batch(contexts, repeat=1):
    contexts = [c for c in contexts for _ in range(repeat)]
    tokens = np.zeros((len(contexts), max(map(len, contexts)) + K - 1), np.int32)
    for i, c in enumerate(contexts):
        tokens[i, :len(c)] = c
    return tokens, np.array([len(c) for c in contexts])


def brute_greedy(target, draft, context):
    """Greedy speculative decoding as written: the draft proposes K argmax tokens on its own, the
    target accepts the longest prefix equal to its argmax at each proposed prefix."""
    proposal = list(context)
    for _ in range(K):
        proposal.append(int(np.argmax(draft(proposal))))
    accepted = 0
    for j in range(K):
        if int(np.argmax(target(proposal[: len(context) + j]))) != proposal[len(context) + j]:
            break
        accepted += 1
    return accepted


def brute_sampled(target, draft, context, k=K):
    """E[tokens accepted] of temperature-1 speculative sampling of k proposals, over all V**k of
    them: each is drafted with probability prod q, and proposal j is kept with probability
    min(1, p / q) if all before it were."""
    expected = 0.0
    for proposal in itertools.product(range(V), repeat=k):
        prob_drafted, run, mean_accepted = 1.0, 1.0, 0.0
        for j, x in enumerate(proposal):
            ctx = list(context) + list(proposal[:j])
            p, q = softmax(target(ctx)), softmax(draft(ctx))
            prob_drafted *= q[x]
            run *= min(1.0, p[x] / q[x])  # P(proposals 0..j all kept | this proposal)
            mean_accepted += run
        expected += prob_drafted * mean_accepted
    return expected


@pytest.mark.parametrize("seed", range(4))
def test_greedy_acceptance_equals_a_brute_force_count(seed):
    (target, target_list), (draft, draft_list) = toy_model(100 + seed), toy_model(200 + seed, like=100 + seed)
    tokens, lengths = as_batch(CONTEXTS)
    got = bench_draft.greedy_accepted(target, {"d": draft}, tokens, lengths, K)["d"]
    want = [brute_greedy(target_list, draft_list, c) for c in CONTEXTS]
    assert got.tolist() == want


def test_greedy_acceptance_is_k_for_the_target_itself_and_counts_every_draft():
    (target, _), (other, _) = toy_model(1), toy_model(2)
    tokens, lengths = as_batch(CONTEXTS)
    got = bench_draft.greedy_accepted(target, {"self": target, "other": other}, tokens, lengths, K)
    assert got["self"].tolist() == [K] * len(CONTEXTS)
    assert got["other"].shape == (len(CONTEXTS),)


@pytest.mark.parametrize("seed", range(3))
def test_sampled_acceptance_matches_the_exact_expectation(seed):
    (target, target_list), (draft, draft_list) = toy_model(300 + seed), toy_model(400 + seed, like=300 + seed)
    repeat = 2000
    tokens, lengths = as_batch(CONTEXTS, repeat)
    expected = bench_draft.sampled_accepted(target, draft, tokens, lengths, K, np.random.default_rng(seed))
    assert expected.shape == (len(tokens), K)
    for i, context in enumerate(CONTEXTS):
        rows = slice(i * repeat, (i + 1) * repeat)
        for k in range(1, K + 1):  # column k - 1: E[accepted] of k proposals
            got, want = expected[rows, k - 1], brute_sampled(target_list, draft_list, context, k)
            # + 1e-3: where min(p, q) is nearly all on one token, the 2,000 paths may all take it
            assert abs(got.mean() - want) < 5 * got.std() / np.sqrt(repeat) + 1e-3, (context, k, got.mean(), want)
        p, q = softmax(target_list(context)), softmax(draft_list(context))
        np.testing.assert_allclose(expected[rows, 0], np.minimum(p, q).sum(), rtol=1e-9)


def test_sampled_acceptance_of_the_target_itself_is_k():
    target, _ = toy_model(5)
    tokens, lengths = as_batch(CONTEXTS)
    expected = bench_draft.sampled_accepted(target, target, tokens, lengths, K, np.random.default_rng(0))
    np.testing.assert_allclose(expected, np.broadcast_to(np.arange(1, K + 1), expected.shape), rtol=1e-9)
