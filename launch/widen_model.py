"""A wider copy of a Llama-layout checkpoint that computes the same function: a large target for
measuring speculative decoding on a CPU, where the 5.5M demo model is too small for a decode step
to wait on its weights.

Every width grows by `factor`: hidden size, attention and kv heads, and MLP width. Every
activation becomes `factor` tiled copies of the original: the residual stream (which RMSNorm leaves
unchanged: the mean of the squares is the same), the heads (head h + j * heads is a copy of head h,
and it reads kv head (h + j * heads) // group, a copy of h's own) and the MLP's hidden units. So
every projection [out, in] is tiled along both axes, which writes `factor` copies of each output,
and divided by `factor`, since it reads `factor` copies of each input. The embedding is tiled; the
output head is untied, the tiled embedding divided by `factor`. Logits equal the source model's up to float rounding
(tests/test_widen_model.py), so a draft distilled against the source is one for the copy too.

Nothing is trained: the copy knows exactly what the source knows, at factor^2 times the cost.

Run:  python -m launch.widen_model --src model/assets/demo --dst /tmp/demo-x4 --factor 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def widen_tensors(tensors: dict[str, np.ndarray], factor: int) -> dict[str, np.ndarray]:
    """The wider checkpoint's tensors, from a Llama-layout state dict (HF names, [out, in])."""
    _check_factor(factor)
    out = {}
    for name, w in tensors.items():
        kind = name.split(".")[-2]
        if not name.endswith(".weight"):
            raise ValueError(f"widen_model does not know the tensor {name!r} (shape {w.shape})")
        if name.endswith("norm.weight"):  # RMSNorm scale over the stream
            out[name] = np.tile(w, factor)
        elif name == "model.embed_tokens.weight":
            out[name] = np.tile(w, (1, factor))
        elif kind in PROJECTIONS:
            out[name] = np.tile(w, (factor, factor)) / factor
        elif name == "lm_head.weight":
            out[name] = np.tile(w, (1, factor)) / factor
        else:
            raise ValueError(f"widen_model does not know the tensor {name!r} (shape {w.shape})")
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"] / factor
    dtype = tensors["model.embed_tokens.weight"].dtype
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in out.items()}


def _check_factor(factor: int) -> None:
    if factor < 1:
        raise ValueError(f"factor={factor} must be at least 1")


def widen_config(config: dict, factor: int) -> dict:
    _check_factor(factor)
    if config.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"widen_model handles Llama and Mistral checkpoints; model_type={config.get('model_type')!r}")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return dict(config, hidden_size=config["hidden_size"] * factor,
                intermediate_size=config["intermediate_size"] * factor,
                num_attention_heads=config["num_attention_heads"] * factor,
                num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]) * factor,
                head_dim=head_dim, tie_word_embeddings=False)


def widen(src: str, dst: str, factor: int) -> str:
    """Writes the `factor`-times wider copy of checkpoint `src` to directory `dst`; returns dst."""
    with open(os.path.join(src, "config.json")) as f:
        config = widen_config(json.load(f), factor)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    os.makedirs(dst, exist_ok=True)
    save_file(widen_tensors(tensors, factor), os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(src, name), dst)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="model/assets/demo")
    p.add_argument("--dst", required=True)
    p.add_argument("--factor", type=int, default=4)
    args = p.parse_args(argv)
    print(widen(args.src, args.dst, args.factor))


if __name__ == "__main__":
    main()
