"""launch/widen_model.py: a wider copy of a checkpoint computes the same function (the large target
bench_speculative measures speculation against)."""

import json

import numpy as np
import pytest
import torch
import transformers

from launch.widen_model import widen
from model import Engine, SamplingParams

DEMO = "model/assets/demo"


def test_the_widened_demo_gives_the_demos_logits_and_tokens(tmp_path):
    path = widen(DEMO, str(tmp_path / "demo-x2"), 2)
    with open(tmp_path / "demo-x2" / "config.json") as f:
        config = json.load(f)
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (512, 8, 4)
    assert config["head_dim"] == 64 and config["tie_word_embeddings"] is False
    ids = torch.tensor(np.random.default_rng(0).integers(3, 4096, size=(2, 40)))
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(DEMO)(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)
    prompts, greedy = ids[:, :12].tolist(), SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = [Engine.from_pretrained(p, mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64).generate(
        prompts, greedy) for p in (DEMO, path)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_a_bad_factor_or_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="factor=0"):
        widen(DEMO, str(tmp_path / "x"), 0)
    src = tmp_path / "gemma"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ValueError, match="model_type='gemma2'"):
        widen(str(src), str(tmp_path / "y"), 2)
