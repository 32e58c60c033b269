"""On 8 fake CPU devices, every (data, model) mesh gives the single-device result."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_reference import make_hf_model, save_hf_model
from model import Engine, SamplingParams
from model.config import PRESETS
from model.sharding import logical_to_spec, make_mesh, split_experts

PROMPTS = [[5, 17, 42], list(range(30, 41)), list(range(100, 117)), [9] * 25, [3, 4], list(range(60, 80))]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, top_k=40, seed=11)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 8 heads, 4 kv heads, ffw 128, vocab 256: everything divides over 2, 4 and (except kv heads) 8.
    hf = make_hf_model("llama", seed=4, num_attention_heads=8, num_key_value_heads=4)
    return save_hf_model(hf, tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    eng = Engine.from_pretrained(checkpoint, mesh_shape=(1, 1), dtype="float32", max_slots=8, max_len=64)
    return eng.logits(PROMPTS), [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8), (8, 1)])
def test_mesh_gives_single_device_tokens(checkpoint, reference, mesh_shape):
    assert len(jax.devices()) == 8
    eng = Engine.from_pretrained(checkpoint, mesh_shape=mesh_shape, dtype="float32", max_slots=8, max_len=64)
    logits, tokens = reference
    np.testing.assert_allclose(eng.logits(PROMPTS), logits, atol=1e-5, equal_nan=True)
    assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == tokens
    data, model = mesh_shape
    # placement really is split: each device holds 1/model of the query heads, 1/data of the slots
    assert eng.params["wq"][0][...].addressable_shards[0].data.shape[0] == 8 // model  # stored [heads, head_dim, d]
    assert eng.cache.k[0][0].addressable_shards[0].data.shape[0] == 8 // data


def test_sampled_tokens_do_not_depend_on_mesh(checkpoint):
    outs = []
    for mesh_shape in [(1, 1), (2, 4)]:
        eng = Engine.from_pretrained(checkpoint, mesh_shape=mesh_shape, dtype="float32", max_slots=8, max_len=64)
        outs.append([o.token_ids for o in eng.generate(PROMPTS, SAMPLED)])
    assert outs[0] == outs[1]


def test_rules_replicate_what_does_not_divide_and_reject_two_dims_on_one_axis():
    mesh = make_mesh((2, 4))
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == P()  # replicated
    assert logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("model")  # trailing Nones dropped, as jit does
    assert logical_to_spec(("embed", "vocab"), (64, 256), mesh) == P(None, "model")
    with pytest.raises(ValueError, match="both map to mesh axis 'model'"):
        logical_to_spec(("q_heads", "ffw"), (8, 128), mesh)
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        make_mesh((4, 4))
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


def test_experts_split_whole_only_where_their_width_slices_would_not_be_whole_lane_tiles():
    """docs/moe.md: Mixtral's 14336-wide experts split by width (1792 = 14 x 128 on 8 devices);
    Qwen3-30B-A3B's 128 experts of width 768 split whole (192-wide slices on 4 are not whole
    tiles); experts that do not divide over "model" always split by width."""
    mixtral, qwen = PRESETS["mixtral-8x7b"], PRESETS["qwen3-30b-a3b"]
    assert not split_experts(mixtral.num_experts, mixtral.intermediate_size, make_mesh((1, 8)))
    assert split_experts(qwen.num_experts, qwen.intermediate_size, make_mesh((2, 4)))
    assert not split_experts(qwen.num_experts, qwen.intermediate_size, make_mesh((8, 1)))  # nothing on "model"
    assert not split_experts(6, 64, make_mesh((2, 4)))  # 6 experts do not divide over 4
    mesh = make_mesh((2, 4))
    # an expert weight [experts, embed, ffw]: the experts dim takes "model" first, the width stays whole
    assert logical_to_spec(("experts", "embed", "ffw"), (8, 64, 48), mesh) == P("model")
    assert logical_to_spec((None, "embed", "ffw"), (8, 64, 48), mesh) == P(None, None, "model")
