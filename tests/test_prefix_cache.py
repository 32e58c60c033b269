"""Prefix caching: identical outputs, hits at every block-aligned length, bounded LRU store."""

import numpy as np
import pytest

from model import Engine, SamplingParams

rng = np.random.default_rng(3)
INSTRUCTION = rng.integers(3, 256, size=40).tolist()  # a labeling instruction shared by every row
ROWS = [INSTRUCTION + rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(1, 12, size=10)]


def make(entries=0, slots=4, **kw):
    return Engine.from_pretrained("tiny-llama", mesh_shape=(1, 1), dtype="float32", max_slots=slots, max_len=96,
                                  seed=2, prefix_cache_entries=entries, prefix_block=8, **kw)


@pytest.fixture(scope="module")
def plain():
    return make()


@pytest.mark.parametrize("sampling", [SamplingParams(max_new_tokens=12, ignore_eos=True),
                                      SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.9, seed=4)])
def test_outputs_identical_with_and_without_prefix_cache(plain, sampling):
    cached = make(entries=4)
    want = [o.token_ids for o in plain.generate(ROWS, sampling)]
    assert [o.token_ids for o in cached.generate(ROWS, sampling)] == want
    stats = cached.prefix_cache.stats
    # the instruction is prefilled once; every later row reuses its 40 // 8 * 8 = 40 tokens
    assert stats.hits == len(ROWS) - 1 and stats.tokens_reused == 40 * (len(ROWS) - 1)
    assert [o.token_ids for o in cached.generate(ROWS, sampling)] == want  # all hits now


def test_hits_at_any_block_aligned_length(plain):
    cached = make(entries=4)
    long = INSTRUCTION + [7] * 20
    cached.generate([long], SamplingParams(max_new_tokens=2))
    pc = cached.prefix_cache
    for n_shared, expect in [(8, 8), (13, 8), (16, 16), (39, 32), (60, 56)]:
        prompt = long[:n_shared] + [5, 5]
        assert pc.lookup(pc.hashes(prompt)) [1] == expect, n_shared
        sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
        assert cached.generate([prompt], sp)[0].token_ids == plain.generate([prompt], sp)[0].token_ids
    assert pc.lookup(pc.hashes([1, 2, 3] + INSTRUCTION)) == (None, 0)  # shared tokens not at the start


def test_store_is_bounded_and_evicts_least_recently_used():
    cached = make(entries=2)
    pc = cached.prefix_cache
    a, b, c = ([int(x)] * 17 for x in (10, 20, 30))
    sp = SamplingParams(max_new_tokens=2)
    for p in (a, b):
        cached.generate([p], sp)
    assert pc.lookup(pc.hashes(a))[1] == 16  # touch a: b is now the least recently used
    cached.generate([c], sp)
    assert len(pc) == 2 and pc.stats.evictions == 1
    assert pc.lookup(pc.hashes(b)) == (None, 0)
    assert pc.lookup(pc.hashes(a))[1] == 16 and pc.lookup(pc.hashes(c))[1] == 16


def test_prompts_shorter_than_a_block_are_not_cached():
    cached = make(entries=2)
    cached.generate([[5] * 8, [6] * 3], SamplingParams(max_new_tokens=2))
    assert len(cached.prefix_cache) == 0  # an 8-token prompt must prefill its last token itself
