"""Ahead-of-time TPU compilation of the engine's own functions (launch/aot.py), on a host without
a TPU; and Engine.abstract, whose weights, cache and state are placed exactly like a real engine's."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from model import Engine
from model.config import PRESETS
from model.sharding import make_mesh

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (requirements-dev.txt): no deviceless TPU compiler")
ISSUE_KEYS = {"fits", "hbm_bytes_per_chip", "peak_bytes_per_chip", "warmup", "decode", "prefill"}
DECODE_KEYS = {"live_fraction", "bytes_accessed_per_chip", "ideal_bytes_per_chip", "compile_s"}
PREFILL_KEYS = {"tokens", "flops_per_chip", "ideal_flops_per_chip", "bytes_accessed_per_chip", "compile_s"}


def _placement(tree):
    return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype), x.sharding), tree)


@pytest.mark.parametrize("quantize,kv", [(None, None), ("int8", "int8")])
def test_abstract_engine_places_weights_cache_and_state_like_the_real_one(quantize, kv):
    mesh_shape = (2, 4)
    real = Engine.from_pretrained("tiny-llama", mesh_shape=mesh_shape, dtype="bfloat16", max_slots=4, max_len=256,
                                  quantize=quantize, kv_cache_dtype=kv)
    abstract = Engine.abstract(PRESETS["tiny-llama"], make_mesh(mesh_shape), dtype="bfloat16", quantize=quantize,
                               max_slots=4, max_len=256, kv_cache_dtype=kv)
    for part in ("params", "cache", "state"):
        assert _placement(getattr(abstract, part)) == _placement(getattr(real, part)), part
    assert not real.abstract and abstract.abstract
    with pytest.raises(RuntimeError, match="abstract"):
        abstract.generate([[1, 2, 3]])


def _aot(*argv, model="tiny-llama"):
    from launch import aot
    logs = []
    result = aot.run(aot.parse_args(["--model", model, "--topology", "v5e:2x2", *argv]),
                     log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    return result, "\n".join(logs)


@needs_libtpu
def test_tiny_model_compiles_for_a_v5e_slice_with_tensor_parallel_mesh():
    result, report = _aot("--mesh", "1,4", "--max_slots", "8", "--max_len", "1024", "--live_fraction", "0.25",
                          "--prefill_batch", "2", "--prefill_len", "64")
    assert ISSUE_KEYS <= set(result) and result["fits"] is True and result["errors"] == []
    assert result["hot_path"] == "tpu"
    assert result["hbm_bytes_per_chip"] == 16 * 2 ** 30 and 0 < result["peak_bytes_per_chip"] < 2 ** 30
    assert [d["live_fraction"] for d in result["decode"]] == [0.25, 1.0]
    for d in result["decode"]:
        assert DECODE_KEYS <= set(d) and d["bytes_accessed_per_chip"] > 0 and d["ideal_bytes_per_chip"] > 0
    # one decode for every live length; its kernel reads the live 512-position blocks: 1 of 2, then 2
    quarter, whole = result["decode"]
    assert quarter["chunks"] == whole["chunks"] == 1
    assert (quarter["positions_read"], whole["positions_read"]) == (512, 1024)
    assert whole["kernel_cache_bytes"] == 2 * quarter["kernel_cache_bytes"] > 0
    prefill = result["prefill"]
    assert PREFILL_KEYS <= set(prefill) and prefill["tokens"] == 128
    assert prefill["flops_per_chip"] > prefill["ideal_flops_per_chip"] > 0
    engine = Engine.abstract(PRESETS["tiny-llama"], make_mesh((1, 4), _v5e()), max_slots=8, max_len=1024)
    functions = engine.warmup_functions()
    # a prefill runs at least 256 tokens on the TPU path: 8 rows of 16 or 32 tokens, 4 or 8 of 64, ...
    assert [f for f in functions if f[0] == "prefill"][:4] == [("prefill", 8, 16), ("prefill", 8, 32),
                                                              ("prefill", 4, 64), ("prefill", 8, 64)]
    rows = sorted({b for b, _ in engine.prefill_shapes()})
    assert functions[-1 - len(rows):] == [("first", b) for b in rows] + [("decode", 1)]
    assert result["warmup"] == {"functions": len(functions), "compile_s": None}
    assert "compiler estimates" in report and "fits: yes" in report


@needs_libtpu
def test_the_speculative_verify_step_compiles_for_the_tpu_and_is_costed_against_decode():
    """k + 1 = 5 queries per row through the Pallas kernel (its blocks must suit the TPU's tiling,
    which interpret mode does not check)."""
    result, report = _aot("--mesh", "1,4", "--max_slots", "8", "--max_len", "1024", "--live_fraction", "1",
                          "--prefill_batch", "2", "--prefill_len", "64", "--speculative", "4")
    v = result["verify"]
    assert result["fits"] and "error" not in v and v["positions_per_row"] == 5
    assert v["bytes_accessed_per_chip"] > 0 and v["kernel_cache_bytes"] > 0 and v["bytes_vs_decode_step"] > 0.5
    functions = Engine.abstract(PRESETS["tiny-llama"], make_mesh((1, 4), _v5e()), max_slots=8, max_len=1024,
                                speculative="ngram").warmup_functions()
    assert functions[-2:] == [("decode", 1), ("verify", 1)]
    assert result["warmup"]["functions"] == len(functions)
    assert "speculative verify step" in report


@needs_libtpu
def test_the_cpu_path_compiles_for_the_tpu_for_comparison_with_one_decode_per_live_chunk_count():
    result, _ = _aot("--mesh", "1,4", "--max_slots", "8", "--max_len", "256", "--live_fraction", "0.25",
                     "--prefill_batch", "2", "--prefill_len", "64", "--hot_path", "cpu")
    assert result["hot_path"] == "cpu" and result["fits"] is True
    # 256 positions in two chunks: a quarter live (+ the engine's in-flight margin) reads one
    assert [(d["chunks"], d["positions_read"]) for d in result["decode"]] == [(1, 128), (2, 256)]
    # 15 buckets (the CPU path's 4 per doubling: 16, 24, 32, ... 224, 256) x rows {1, 2, 4, 8},
    # the first tokens of each row count, a decode per chunk count
    assert result["warmup"] == {"functions": 15 * 4 + 4 + 2, "compile_s": None}


def _v5e():
    from launch import aot
    return aot.tpu_devices("v5e:2x2")


@needs_libtpu
@pytest.mark.slow
def test_data_and_model_parallel_mesh_shards_the_cache_and_warms_up_every_function():
    result, _ = _aot("--mesh", "2,2", "--max_slots", "2", "--max_len", "64", "--prefill_batch", "2",
                     "--prefill_len", "32", "--warmup")
    cfg = PRESETS["tiny-llama"]
    whole_cache = 2 * 2 * 64 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # slots, len, k+v, bf16
    assert result["resident_bytes_per_chip"]["kv_cache"] == whole_cache // 4  # slots over data, kv heads over model
    assert result["fits"] is True and result["decode"][-1]["live_fraction"] == 1.0
    # 3 buckets x 2 rows (at least 256 tokens a call, at most 2 rows here), the first tokens of 2 rows, one decode
    assert result["warmup"]["functions"] == 5 and result["warmup"]["compile_s"] > 0


@needs_libtpu
def test_a_configuration_too_big_for_the_chip_is_refused_with_its_numbers(tmp_path, capsys):
    from launch import aot
    out = tmp_path / "aot.json"
    code = aot.main(["--model", "tiny-llama", "--topology", "v5e:2x2", "--mesh", "1,4", "--max_slots", "10000000",
                     "--max_len", "2048", "--json", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    assert result["fits"] is False and result["peak_bytes_per_chip"] > result["hbm_bytes_per_chip"]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: tiny-llama does not fit 10000000 slots x 2048 on v5e:2x2")
    assert "KV cache 4882.81 GiB" in err and "16.00 GiB HBM of a v5e chip" in err


@needs_libtpu
def test_a_mixture_of_experts_compiles_and_its_ideal_counts_the_experts_its_rows_hit():
    from launch import aot
    cfg = PRESETS["tiny-mixtral"]
    result, report = _aot("--mesh", "2,2", "--max_slots", "4", "--max_len", "256", "--live_fraction", "0.5",
                          "--prefill_batch", "2", "--prefill_len", "32", model="tiny-mixtral")
    assert result["fits"] is True and result["errors"] == []
    # 2 rows per data group, top-2 of 8: 8 (1 - (6/8)^2) = 3.5 experts expected
    assert result["expected_experts_hit_per_step"] == pytest.approx(3.5)
    assert aot.expected_experts_hit(PRESETS["mixtral-8x7b"], 64) == pytest.approx(8.0)
    # per chip (bf16, halved over "model"): the idle experts' share and the embedding table are not read
    experts = 3 * cfg.num_layers * cfg.num_experts * cfg.hidden_size * cfg.intermediate_size * 2 // 2
    embed = cfg.vocab_size * cfg.hidden_size * 2 // 2
    unread = result["resident_bytes_per_chip"]["weights"] - result["decode_weight_bytes_per_chip"]
    assert unread == round(experts * (1 - 3.5 / 8)) + embed
    assert result["decode"][0]["bytes_accessed_per_chip"] > 0 and result["prefill"]["flops_per_chip"] > 0
    assert "2 of 8 experts" in report


@needs_libtpu
@pytest.mark.parametrize("kv", [None, "int8"])
def test_decode_writes_the_cache_in_place_with_several_kv_heads_per_chip(kv):
    """With two kv heads of 128 lanes on each chip and the slots split over "data", a decode
    step's cache write once made the compiler lay the cache out for the write's [kv, head_dim]
    rows and copy every layer into the kernel's layout and back (19.8 GB of temporaries per chip
    on the 8B shape's (2, 4) mesh; here, with 64 slots per chip). The step's temporaries stay
    below one layer's keys."""
    from model.config import llama_preset
    cfg = llama_preset(vocab=256, hidden=512, layers=2, heads=4, kv_heads=4, ffw=256)  # head_dim 128
    engine = Engine.abstract(cfg, make_mesh((2, 2), _v5e()), dtype="bfloat16", max_slots=128, max_len=1024,
                             kv_cache_dtype=kv)
    memory = engine.lower_decode(1).compile().memory_analysis()
    per_layer_k = 64 * 2 * 1024 * 128 * (1 if kv else 2)  # slots, kv heads, positions, head_dim per chip
    assert memory.temp_size_in_bytes < per_layer_k  # before: 204 MB (bfloat16), 138 MB (int8)
