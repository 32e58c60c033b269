"""Each layer (norm, RoPE, attention, MLP or mixture of experts) against the same HF transformers
module, for every layer of the tiny models (Gemma 2 and 3 and Phi-3's layers differ in window and
RoPE)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from hf_reference import VARIANTS, make_hf_model, save_hf_model
from model import Engine
from model.config import rope_attention_factor, rope_inv_freq
from model.decoder import (attention, attention_mask, expert_capacity, fused_linear, gated_mlp, linear, moe_mlp,
                           moe_mlp_batched, rms_norm, rope,
                           to_cache_layout)

SEEDS = (0, 1, 2)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_cls,offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0)])
def test_rms_norm(norm_cls, offset, seed):
    torch.manual_seed(seed)
    norm = norm_cls(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(2, 5, 48) * 3
    ours = rms_norm(jnp.asarray(_np(x)), jnp.asarray(_np(norm.weight)), 1e-6, offset)
    np.testing.assert_allclose(np.asarray(ours), _np(norm(x)), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=list(VARIANTS))
def layer0(request, tmp_path_factory):
    """(variant, HF model, our engine) on the same random weights, for pulling out their layers."""
    hf = make_hf_model(request.param, seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_len=64)


def _layer_params(engine, i=0):
    """Layer i's weights in the params format (the CPU path stores its matmul weights outputs first)."""
    return {k: v[i] for k, v in engine.weights().items() if isinstance(v, list)}


def _hf_rope(hf, cfg, layer: int, x, positions):
    """HF's (inv_freq, attention factor, cos, sin) for `layer`: Gemma 3 keeps one RoPE per layer type."""
    rotary = hf.model.rotary_emb
    if hasattr(rotary, "layer_types"):
        kind = hf.config.layer_types[layer]
        cos, sin = rotary(x, positions, kind)
        return getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling"), cos, sin
    cos, sin = rotary(x, positions)
    return rotary.inv_freq, rotary.attention_scaling, cos, sin


def test_rope(layer0):
    """Every layer's inverse frequencies and cos/sin factor (llama3, linear, LongRoPE scaling;
    Gemma 3's local RoPE on sliding layers) equal HF's, and so do the rotated q and k."""
    _, hf, engine = layer0
    cfg = engine.cfg
    torch.manual_seed(0)
    n, h = cfg.num_heads, cfg.head_dim
    q, k = torch.randn(2, n, 40, h), torch.randn(2, n, 40, h)
    positions = torch.stack([torch.arange(40), torch.arange(100, 140)])  # also far positions
    for layer in range(cfg.num_layers):
        inv_freq, factor, cos, sin = _hf_rope(hf, cfg, layer, q, positions)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
        # HF picks LongRoPE's factors by the positions it is given (here up to 140): so does max_len
        ours = rope_inv_freq(cfg, max_len=140, sliding=cfg.is_sliding(layer))
        np.testing.assert_allclose(np.asarray(ours, np.float32), _np(inv_freq), rtol=1e-6)
        assert rope_attention_factor(cfg, cfg.is_sliding(layer)) == pytest.approx(factor)
        for x, ref in ((q, ref_q), (k, ref_k)):
            args = (jnp.asarray(_np(x).transpose(0, 2, 1, 3)), jnp.asarray(positions.numpy()),
                    jnp.asarray(_np(inv_freq)), factor)
            got = rope(*args)
            np.testing.assert_allclose(np.asarray(got), _np(ref).transpose(0, 2, 1, 3), atol=2e-5)
            # the accelerator path's form: the swapped halves by a +-1 matmul, exact in bfloat16 too
            np.testing.assert_allclose(np.asarray(rope(*args, swap_by_matmul=True)), np.asarray(got), atol=1e-6)
            low = (args[0].astype(jnp.bfloat16), *args[1:], jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(rope(*low, swap_by_matmul=True), np.float32),
                                          np.asarray(rope(*low), np.float32))


def test_attention(layer0):
    """Every layer's attention block: q/k/v projections (+ Qwen2 bias), q/k norms (Qwen3,
    Gemma 3), RoPE of the layer's kind, masked GQA softmax with the layer's window, the scale
    and soft-cap (Gemma 2), output projection."""
    variant, hf, engine = layer0
    cfg = engine.cfg
    torch.manual_seed(1)
    t = 20
    x = torch.randn(1, t, cfg.hidden_size)
    positions = torch.arange(t)[None]
    pos = jnp.asarray(positions.numpy())
    for layer in range(cfg.num_layers):
        w = _layer_params(engine, layer)
        window = cfg.layer_windows[layer]
        mask = np.array(attention_mask(pos, jnp.arange(t), window))
        additive = torch.where(torch.from_numpy(mask)[:, None], 0.0, torch.finfo(torch.float32).min)
        inv_freq, factor, cos, sin = _hf_rope(hf, cfg, layer, x, positions)
        with torch.no_grad():
            ref = hf.model.layers[layer].self_attn(x, position_embeddings=(cos, sin), attention_mask=additive)[0]

        h = jnp.asarray(_np(x))
        q = jnp.einsum("btd,dnh->btnh", h, w["wq"])
        k = jnp.einsum("btd,dkh->btkh", h, w["wk"])
        v = jnp.einsum("btd,dkh->btkh", h, w["wv"])
        if cfg.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        if cfg.qk_norm:
            q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps, cfg.norm_weight_offset)
            k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps, cfg.norm_weight_offset)
        inv_freq = jnp.asarray(_np(inv_freq))
        out = attention(rope(q, pos, inv_freq, factor), *to_cache_layout(rope(k, pos, inv_freq, factor), v),
                        jnp.asarray(mask), scale=cfg.attn_scale, softcap=cfg.attn_logit_softcapping)
        ours = jnp.einsum("btnh,nhd->btd", out, w["wo"])
        np.testing.assert_allclose(np.asarray(ours), _np(ref), atol=1e-5 * max(1.0, np.abs(_np(ref)).max()),
                                   err_msg=f"layer {layer}")
    if variant in ("mistral", "gemma2", "phi3"):
        windowed = np.array(attention_mask(pos, jnp.arange(t), cfg.layer_windows[0]))
        assert not windowed[0, -1, 0], f"a 20-token prompt with window {cfg.sliding_window} must mask the first key"


def test_mlp(layer0):
    """The gated MLP, or a mixture of experts' sparse block (router, top-k, experts) on every layer."""
    _, hf, engine = layer0
    cfg = engine.cfg
    torch.manual_seed(2)
    x = torch.randn(2, 7, cfg.hidden_size)
    for layer in range(cfg.num_layers):
        w = _layer_params(engine, layer)
        with torch.no_grad():
            ref = hf.model.layers[layer].mlp(x)
        h = jnp.asarray(_np(x))
        if cfg.num_experts:
            ours = moe_mlp(h, w["router"], w["w_gate"], w["w_up"], w["w_down"], cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, cfg.activation)
        else:
            ours = gated_mlp(h, w["w_gate"], w["w_up"], w["w_down"], cfg.activation)
        np.testing.assert_allclose(np.asarray(ours), _np(ref), rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("head_dim", [None, 2])
def test_projections_fused_into_one_matmul_equal_one_matmul_each(groups, int8, head_dim):
    """fused_linear (a prefill's q/k/v, and gate/up, on the accelerator path): the weights
    concatenated per device group, as flat columns or as heads of head_dim, give each weight's own
    product, int8 scales included; and the gated MLP with gate and up fused equals it without."""
    import jax
    from model.quantize import quantize
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 5, 16))
    ws = [jax.random.normal(keys[i], (16, n)) for i, n in ((1, 32), (2, 8), (3, 8))]
    if int8:
        ws = [quantize(w, (0,)) for w in ws]
    for ours, w in zip(fused_linear(x, ws, groups, head_dim), ws):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(linear("btd,df->btf", x, w)), rtol=1e-5, atol=1e-5)
    down = jax.random.normal(keys[4], (32, 16))
    np.testing.assert_allclose(np.asarray(gated_mlp(x, ws[0], ws[0], down, "silu", groups=groups)),
                               np.asarray(gated_mlp(x, ws[0], ws[0], down, "silu")), rtol=1e-5, atol=1e-5)


def test_the_mixture_of_experts_runs_grouped_matmuls_not_every_expert_on_every_token():
    """Three ragged_dots over the (token, expert) pairs sorted by expert: t * k rows, whatever the
    number of experts; and a token's output depends only on its chosen experts."""
    import jax
    e, d, f, k, t = 8, 16, 12, 2, 5
    keys = jax.random.split(jax.random.key(0), 5)
    router = jax.random.normal(keys[0], (d, e))
    gate, up = (jax.random.normal(keys[i], (e, d, f)) for i in (1, 2))
    down = jax.random.normal(keys[3], (e, f, d))
    x = jax.random.normal(keys[4], (1, t, d))
    run = lambda dn: moe_mlp(x, router, gate, up, dn, k, True, "silu")  # noqa: E731
    jaxpr = str(jax.make_jaxpr(run)(down))
    assert jaxpr.count("ragged_dot_general") == 3 and f"f32[{t * k},{f}]" in jaxpr
    chosen = np.asarray(jax.lax.top_k(x[0] @ router, k)[1])
    idle = sorted(set(range(e)) - set(chosen[0].tolist()))
    poked = down.at[np.asarray(idle)].set(1e3)  # weights no row of token 0 uses
    np.testing.assert_array_equal(np.asarray(run(poked))[0, 0], np.asarray(run(down))[0, 0])


@pytest.mark.parametrize("same_tokens", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_the_cpu_paths_batched_experts_give_the_grouped_matmuls_result(same_tokens, int8):
    """moe_mlp_batched (each expert's rows in a block of expert_capacity rows, batched matmuls)
    equals moe_mlp: with rows spread over the experts, and with every token alike, so that two
    experts get all 16 rows, past the capacity of 8 (the step then runs with blocks of 16); with
    int8 weights; and with the experts held in two halves (first_expert), whose sum is the whole."""
    import jax

    from model.quantize import quantize
    e, d, f, k, t = 8, 16, 12, 2, 16
    keys = jax.random.split(jax.random.key(1), 5)
    router = jax.random.normal(keys[0], (d, e))
    gate, up = (jax.random.normal(keys[i], (e, d, f)) for i in (1, 2))
    down = jax.random.normal(keys[3], (e, f, d))
    x = jax.random.normal(keys[4], (2, t // 2, d))
    if same_tokens:
        x = jnp.broadcast_to(x[:1, :1], x.shape)
    ws = [quantize(w, (1,)) for w in (gate, up, down)] if int8 else [gate, up, down]
    assert expert_capacity(t, k, e) == 8
    want = np.asarray(moe_mlp(x, router, *ws, k, True, "silu"))
    np.testing.assert_allclose(np.asarray(moe_mlp_batched(x, router, *ws, k, True, "silu")), want, rtol=1e-5, atol=1e-5)
    halves = [jax.tree.map(lambda a, h=h: a[h * e // 2:(h + 1) * e // 2], ws) for h in (0, 1)]
    split = sum(np.asarray(moe_mlp_batched(x, router, *half, k, True, "silu", first_expert=h * e // 2))
                for h, half in enumerate(halves))
    np.testing.assert_allclose(split, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 200])  # the transposed form (<= FEATURES_MAX_ROWS rows) and the plain one
@pytest.mark.parametrize("int8", [False, True])
def test_weights_stored_outputs_first_give_the_params_format_products(rows, int8):
    from model.decoder import OUTPUTS_FIRST, _permuted, gated_mlp_stored, linear_stored
    from model.quantize import quantize
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, rows, 32), np.float32))
    wq, wo = (jnp.asarray(rng.standard_normal(s, np.float32) * 0.1) for s in ((32, 4, 8), (4, 8, 32)))
    mlp = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.1) for s in ((32, 48), (32, 48), (48, 32))]
    if int8:
        wq, wo = quantize(wq, (0,)), quantize(wo, (0, 1))
        mlp = [quantize(w, (0,)) for w in mlp]
    q = linear("btd,dnh->btnh", x, wq)
    np.testing.assert_allclose(linear_stored(x, _permuted(wq, OUTPUTS_FIRST["wq"]), 1), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear_stored(q, _permuted(wo, OUTPUTS_FIRST["wo"]), 2),
                               linear("btnh,nhd->btd", q, wo), rtol=1e-5, atol=1e-5)
    stored = [_permuted(w, OUTPUTS_FIRST[n]) for w, n in zip(mlp, ("w_gate", "w_up", "w_down"))]
    np.testing.assert_allclose(gated_mlp_stored(x, *stored, "silu"), gated_mlp(x, *mlp, "silu"), rtol=1e-5, atol=1e-5)
