"""Checkpoint loading: single-file and sharded safetensors, dtypes, errors, sharded placement, gs://."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_reference import hf_logits, make_hf_model, save_hf_model
from model import Engine
from model.params import param_specs
from model.sharding import logical_to_spec

PROMPTS = [[5, 17, 42, 3, 99, 250, 7], list(range(100, 120))]
SMALL_SHARDS = "20KB"  # a tiny model's tensors are 2-64 KB: about a dozen shard files


def load(path, mesh_shape=(1, 1), dtype="float32") -> Engine:
    return Engine.from_pretrained(str(path), mesh_shape=mesh_shape, dtype=dtype, max_slots=2, max_len=64)


def params_of(engine: Engine) -> dict[str, jax.Array]:
    """name -> value; a per-layer weight's layers stacked (only for comparing here)."""
    return {name: np.stack(v) if isinstance(v, list) else v for name, v in engine.weights().items()}


def assert_logits_match_hf(engine: Engine, hf, atol: float):
    ours = engine.logits(PROMPTS)
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(ours[i, : len(p)], hf_logits(hf, p), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama saved as one model.safetensors, and the HF model."""
    hf = make_hf_model("llama", seed=3)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("llama-single"))


def edited_copy(src, dst, edit) -> str:
    """A copy of checkpoint `src` whose model.safetensors tensors went through `edit(dict)`."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


# ---------------------------------------------------------------- single file vs sharded


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma", "phi3", "mixtral"])
def test_single_and_sharded_checkpoints_load_the_same(variant, tmp_path):
    hf = make_hf_model(variant, seed=1)
    single = save_hf_model(hf, tmp_path / "single")
    sharded = save_hf_model(hf, tmp_path / "sharded", max_shard_size=SMALL_SHARDS)
    assert sorted(f for f in os.listdir(single) if f.endswith(".safetensors")) == ["model.safetensors"]
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in os.listdir(sharded)

    a, b = load(single), load(sharded)
    pa, pb = params_of(a), params_of(b)
    assert set(pa) == set(param_specs(a.cfg))
    for name in pa:
        assert pa[name].dtype == np.float32, name
        np.testing.assert_array_equal(np.asarray(pa[name]), np.asarray(pb[name]), err_msg=name)
    assert_logits_match_hf(a, hf, atol=1e-4)
    assert_logits_match_hf(b, hf, atol=1e-4)


def test_weights_land_in_our_layout(llama):
    """Spot checks against HF tensors by hand, independent of the loader's name map."""
    hf, path = llama
    p = params_of(load(path))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    n, h = hf.config.num_attention_heads, hf.config.hidden_size // hf.config.num_attention_heads
    np.testing.assert_array_equal(p["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(p["lm_head"], sd["lm_head.weight"].T)
    wq1, wo0 = sd["model.layers.1.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(p["wq"][1], wq1.T.reshape(-1, n, h))  # [in, out] -> [d, heads, head_dim]
    np.testing.assert_array_equal(p["wo"][0], wo0.T.reshape(n, h, -1))
    np.testing.assert_array_equal(p["w_down"][1], sd["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(p["mlp_norm"][1], sd["model.layers.1.post_attention_layernorm.weight"])


@pytest.mark.parametrize("variant,prefix,names", [
    ("mixtral", "model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")),
    ("qwen3-moe", "model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")),
])
def test_expert_tensors_stack_into_our_layout_and_save_back(variant, prefix, names, tmp_path):
    """One checkpoint tensor per expert ([out, in]) -> w_gate / w_up / w_down [experts, in, out];
    the router [experts, embed] -> [embed, experts]. save_params writes them back one per expert,
    and a missing expert is named."""
    path = save_hf_model(make_hf_model(variant, seed=1), tmp_path / "hf")
    engine = load(path)
    p, sd = params_of(engine), load_file(os.path.join(path, "model.safetensors"))
    layer = prefix.format(i=1)
    for ours, theirs in zip(("w_gate", "w_up", "w_down"), names):
        for j in range(engine.cfg.num_experts):
            np.testing.assert_array_equal(p[ours][1][j], sd[f"{layer}.experts.{j}.{theirs}.weight"].T, err_msg=ours)
    np.testing.assert_array_equal(p["router"][1], sd[f"{layer}.gate.weight"].T)

    from model.weights import save_params
    save_params(str(tmp_path / "ours"), engine.cfg, engine.weights())
    again = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(again) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(again[key], sd[key], err_msg=key)

    gone = f"{prefix.format(i=0)}.experts.3.{names[2]}.weight"
    broken = edited_copy(path, tmp_path / "broken", lambda t: t.pop(gone))
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{gone}"):
        load(broken)


def test_fused_and_renamed_tensors_land_in_our_layout(tmp_path):
    """Phi-3's fused qkv_proj and gate_up_proj are split into our wq/wk/wv and w_gate/w_up (each
    read as its own rows); Gemma 2's four norms per layer map to ours by role, not by name."""
    phi = make_hf_model("phi3", seed=1)
    p = params_of(load(save_hf_model(phi, tmp_path / "phi")))
    sd = {k: v.numpy() for k, v in phi.state_dict().items()}
    n, kv, h, f = 4, 2, 16, 128
    qkv, gate_up = sd["model.layers.1.self_attn.qkv_proj.weight"], sd["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(p["wq"][1], qkv[: n * h].T.reshape(-1, n, h))
    np.testing.assert_array_equal(p["wk"][1], qkv[n * h: (n + kv) * h].T.reshape(-1, kv, h))
    np.testing.assert_array_equal(p["wv"][1], qkv[(n + kv) * h:].T.reshape(-1, kv, h))
    np.testing.assert_array_equal(p["w_gate"][1], gate_up[:f].T)
    np.testing.assert_array_equal(p["w_up"][1], gate_up[f:].T)

    gemma = make_hf_model("gemma2", seed=1)
    p = params_of(load(save_hf_model(gemma, tmp_path / "gemma")))
    layer = gemma.model.layers[1]
    for ours, theirs in (("attn_norm", layer.input_layernorm), ("post_attn_norm", layer.post_attention_layernorm),
                         ("mlp_norm", layer.pre_feedforward_layernorm),
                         ("post_mlp_norm", layer.post_feedforward_layernorm)):
        np.testing.assert_array_equal(p[ours][1], theirs.weight.detach().numpy(), err_msg=ours)


def test_a_fused_tensor_of_the_wrong_shape_is_named(tmp_path):
    path = save_hf_model(make_hf_model("phi3", seed=0), tmp_path / "phi")

    def shrink(t):
        t["model.layers.0.self_attn.qkv_proj.weight"] = t["model.layers.0.self_attn.qkv_proj.weight"][:96]

    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape "
                                         r"\(96, 64\); expected \(128, 64\)"):
        load(edited_copy(path, tmp_path / "c", shrink))


@pytest.mark.parametrize("variant", ["qwen3", "gemma2", "gemma3", "phi3-longrope"])
def test_saved_params_load_in_transformers_as_the_same_model(variant, tmp_path):
    """save_params writes HF's names, packing and config.json (soft-caps, layer kinds, local RoPE,
    LongRoPE): transformers reads it back as the model it came from."""
    import transformers

    from model.weights import save_params

    hf = make_hf_model(variant, seed=3)
    engine = load(save_hf_model(hf, tmp_path / "in"))
    save_params(str(tmp_path / "out"), engine.cfg, engine.weights())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(back) is type(hf)
    for p in PROMPTS:
        np.testing.assert_allclose(hf_logits(back, p), hf_logits(hf, p), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- dtypes


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    hf = make_hf_model("qwen2", seed=2).to(torch.bfloat16)
    path = save_hf_model(hf, tmp_path_factory.mktemp("bf16"), max_shard_size=SMALL_SHARDS)
    header_dtypes = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with open(os.path.join(path, f), "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            header_dtypes |= {m["dtype"] for k, m in header.items() if k != "__metadata__"}
    assert header_dtypes == {"BF16"}
    return hf, path


def test_bf16_checkpoint_loads_as_float32(bf16_checkpoint):
    hf, path = bf16_checkpoint
    engine = load(path, dtype="float32")
    p = params_of(engine)
    assert {v.dtype for v in p.values()} == {np.dtype(np.float32)}
    expected = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(p["embed"], expected)
    np.testing.assert_array_equal(p["bk"][1].reshape(-1),
                                  hf.model.layers[1].self_attn.k_proj.bias.detach().float().numpy())
    # The float32 copy of the bf16 model has exactly the loaded values: logits agree as for float32.
    # A float32 model holding the bf16 values (not hf.float(): that would keep the rotary
    # frequencies that .to(bfloat16) rounded) agrees with the float32 engine as closely as ever.
    reference = make_hf_model("qwen2", seed=2)
    reference.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    assert_logits_match_hf(engine, reference, atol=1e-4)


def test_bf16_checkpoint_loads_as_bfloat16(bf16_checkpoint):
    _, path = bf16_checkpoint
    p16, p32 = params_of(load(path, dtype="bfloat16")), params_of(load(path, dtype="float32"))
    for name in p32:
        assert p16[name].dtype == jax.numpy.bfloat16, name
        np.testing.assert_array_equal(np.asarray(p16[name]).astype(np.float32), np.asarray(p32[name]),
                                      err_msg=name)


def test_float32_checkpoint_rounds_to_bfloat16(llama):
    hf, path = llama
    p = params_of(load(path, dtype="bfloat16"))
    assert p["wk"].dtype == jax.numpy.bfloat16
    expected = hf.model.layers[0].self_attn.k_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(p["wk"][0]).astype(np.float32).reshape(expected.T.shape),
                                  expected.T)


# ---------------------------------------------------------------- errors


def test_missing_tensor_is_named(llama, tmp_path):
    path = edited_copy(llama[1], tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(path)


def test_unexpected_tensor_is_named(llama, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)

    with pytest.raises(ValueError, match=r"unexpected tensor.*'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        load(edited_copy(llama[1], tmp_path / "c", add))


def test_wrong_shape_is_named(llama, tmp_path):
    def shrink(t):
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][:32]

    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj\.weight' has shape "
                                         r"\(32, 64\); expected \(64, 64\)"):
        load(edited_copy(llama[1], tmp_path / "c", shrink))


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_checkpoint_is_never_loaded(llama, tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    shutil.copy(os.path.join(llama[1], "config.json"), ckpt)
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Tripwire(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError,
                       match=r"no model\.safetensors.*pytorch_model\.bin.*only safetensors"):
        load(ckpt)
    assert not marker.exists()


def test_missing_config_json(llama, tmp_path):
    shutil.copytree(llama[1], tmp_path / "c")
    os.remove(tmp_path / "c" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"c/config\.json not found"):
        load(tmp_path / "c")


def test_unsupported_architecture_lists_supported(llama, tmp_path):
    shutil.copytree(llama[1], tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported; "
                                         r"supported: .*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load(tmp_path / "c")


def test_git_lfs_pointer_is_named(llama, tmp_path):
    shutil.copytree(llama[1], tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 123456\n")
    with pytest.raises(ValueError, match=r"c/model\.safetensors: not a safetensors file"):
        load(tmp_path / "c")


def test_truncated_file_is_named(llama, tmp_path):
    shutil.copytree(llama[1], tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"c/model\.safetensors: tensor .* corrupt or truncated"):
        load(tmp_path / "c")


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path):
    path = save_hf_model(make_hf_model("llama", seed=0), tmp_path / "c", max_shard_size=SMALL_SHARDS)
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    key = "model.layers.0.self_attn.k_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=rf"index puts tensor '{key}' in {other}, which does not contain it"):
        load(path)


# ---------------------------------------------------------------- sharded placement


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_sharded_placement_follows_the_rules(variant, tmp_path):
    assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
    hf = make_hf_model(variant, seed=4)
    path = save_hf_model(hf, tmp_path, max_shard_size=SMALL_SHARDS)
    sharded, single = load(path, mesh_shape=(2, 4)), load(path)
    ours, reference = params_of(sharded), params_of(single)
    split = []
    weights = sharded.weights()
    for name, spec in param_specs(sharded.cfg).items():
        want = logical_to_spec(spec.axes, spec.shape, sharded.mesh)
        for param in weights[name] if spec.per_layer else [weights[name]]:  # every layer's array
            assert param.sharding.mesh.shape == {"data": 2, "model": 4}
            assert param.sharding.spec == want, name
            if any(want):
                assert param.addressable_shards[0].data.size < param.size, name
        if any(want):
            split.append(name)
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(reference[name]), err_msg=name)
    assert {"wq", "w_up", "embed"} <= set(split)  # the mesh really split something
    np.testing.assert_allclose(sharded.logits(PROMPTS), single.logits(PROMPTS), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- gs:// through a local GCS emulator


def test_gs_checkpoint_loads_like_local(gcs, tmp_path):
    hf = make_hf_model("qwen2", seed=5)
    local = save_hf_model(hf, tmp_path / "ckpt", max_shard_size=SMALL_SHARDS)
    gcs.put(local, "ckpts/qwen", recursive=True)
    assert "ckpts/qwen/model.safetensors.index.json" in gcs.ls("ckpts/qwen", detail=False)

    remote = load("gs://ckpts/qwen")
    local_logits = load(local).logits(PROMPTS)
    np.testing.assert_array_equal(remote.logits(PROMPTS), local_logits)
    assert_logits_match_hf(remote, hf, atol=1e-4)


def test_gs_errors_name_the_path(gcs, llama):
    gcs.put(os.path.join(llama[1], "config.json"), "ckpts/no-weights/config.json")
    with pytest.raises(FileNotFoundError,
                       match=r"gs://ckpts/no-weights: no model\.safetensors.*config\.json"):
        load("gs://ckpts/no-weights")
    with pytest.raises(FileNotFoundError, match=r"gs://ckpts/nothing-here/config\.json not found"):
        load("gs://ckpts/nothing-here")
