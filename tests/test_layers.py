"""Each layer (norm, RoPE, attention, MLP) against the same HF transformers module."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from hf_reference import VARIANTS, make_hf_model, save_hf_model
from model import Engine
from model.config import rope_inv_freq
from model.decoder import attention, attention_mask, gated_mlp, rms_norm, rope, to_cache_layout

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
    """(HF model, our engine) on the same random weights, for pulling out layer 0 of each."""
    hf = make_hf_model(request.param, seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, Engine.from_pretrained(path, mesh_shape=(1, 1), dtype="float32", max_len=64)


def _layer_params(engine, i=0):
    return {k: v[i][...] for k, v in engine.params.items() if not hasattr(v, "get_value")}


def test_rope(layer0):
    _, hf, engine = layer0
    torch.manual_seed(0)
    n, h = engine.cfg.num_heads, engine.cfg.head_dim
    q, k = torch.randn(2, n, 40, h), torch.randn(2, n, 40, h)
    positions = torch.stack([torch.arange(40), torch.arange(100, 140)])  # also far positions
    cos, sin = hf.model.rotary_emb(q, positions)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    inv_freq = jnp.asarray(_np(hf.model.rotary_emb.inv_freq))
    # our inverse frequencies (incl. llama3 scaling) equal HF's
    np.testing.assert_allclose(np.asarray(rope_inv_freq(engine.cfg), np.float32), np.asarray(inv_freq), rtol=1e-6)
    for x, ref in ((q, ref_q), (k, ref_k)):
        ours = rope(jnp.asarray(_np(x).transpose(0, 2, 1, 3)), jnp.asarray(positions.numpy()), inv_freq)
        np.testing.assert_allclose(np.asarray(ours), _np(ref).transpose(0, 2, 1, 3), atol=2e-5)


def test_attention(layer0):
    """q/k/v projections (+ Qwen2 bias), RoPE, masked GQA softmax, output projection."""
    variant, hf, engine = layer0
    cfg, w = engine.cfg, _layer_params(engine)
    torch.manual_seed(1)
    t = 20
    x = torch.randn(1, t, cfg.hidden_size)
    positions = torch.arange(t)[None]
    mask = np.array(attention_mask(jnp.asarray(positions.numpy()), jnp.arange(t), cfg.sliding_window))
    additive = torch.where(torch.from_numpy(mask)[:, None], 0.0, torch.finfo(torch.float32).min)
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():
        ref = attn(x, position_embeddings=hf.model.rotary_emb(x, positions), attention_mask=additive)[0]

    h = jnp.asarray(_np(x))
    q = jnp.einsum("btd,dnh->btnh", h, w["wq"])
    k = jnp.einsum("btd,dkh->btkh", h, w["wk"])
    v = jnp.einsum("btd,dkh->btkh", h, w["wv"])
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    inv_freq = jnp.asarray(_np(hf.model.rotary_emb.inv_freq))
    pos = jnp.asarray(positions.numpy())
    out = attention(rope(q, pos, inv_freq), *to_cache_layout(rope(k, pos, inv_freq), v), jnp.asarray(mask))
    ours = jnp.einsum("btnh,nhd->btd", out, w["wo"])
    np.testing.assert_allclose(np.asarray(ours), _np(ref), atol=1e-5 * max(1.0, np.abs(_np(ref)).max()))
    if variant == "mistral":
        assert not mask[0, -1, 0], "a 20-token prompt with window 8 must mask the first key"


def test_mlp(layer0):
    _, hf, engine = layer0
    w = _layer_params(engine)
    torch.manual_seed(2)
    x = torch.randn(2, 7, engine.cfg.hidden_size)
    with torch.no_grad():
        ref = hf.model.layers[0].mlp(x)
    ours = gated_mlp(jnp.asarray(_np(x)), w["w_gate"], w["w_up"], w["w_down"], engine.cfg.activation)
    np.testing.assert_allclose(np.asarray(ours), _np(ref), rtol=1e-5, atol=1e-5)
