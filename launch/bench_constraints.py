"""Structured-output libraries measured for this engine's needs (issue 12): outlines-core, xgrammar and
llguidance, on the demo tokenizer (SentencePiece, 4,096 pieces) and a 128k byte-level BPE vocabulary.

For each library and constraint (the labeling JSON schema, a regex, a choice list, any JSON object):
compile time (median of 3, caches off), and the host time of one token mask along a valid 40-token output. For outlines-core,
the only one of the three that exposes a token-level DFA, also model.constraints' tables: states,
token classes, bytes against a dense [states, vocab] table; and the cost of mask_logits + advance in
a jitted step at batch 32.

No 128k tokenizer ships or can be downloaded, so one is trained here from the Python standard
library's sources (byte-level BPE as GPT-2 and Llama 3 use, 128,000 tokens, ~80 s) and kept in
--workdir for later runs.

    python -m launch.bench_constraints                      # ~3 minutes; writes bench_constraints.json
    python -m launch.bench_constraints --skip-128k          # demo tokenizer only, ~20 s

outlines-core is a requirement; the two others are measured when installed (xgrammar without its
dependencies: it would pull triton, and imports without it on CPU):
    pip install llguidance==1.9.1 && pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import sysconfig
import tempfile
import time

import numpy as np

SCHEMA = {"type": "object",
          "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "confidence": {"type": "number"},
                         "reason": {"type": "string", "maxLength": 80}},
          "required": ["label", "confidence", "reason"]}
REGEX = r"[A-Z][a-z]{2,9}-[0-9]{3}"  # [0-9]: \d is any Unicode digit in outlines-core, ASCII in xgrammar
CHOICE = ["positive", "negative", "neutral", "mixed"]
CONSTRAINTS = [("json_schema", SCHEMA), ("regex", REGEX), ("choice", CHOICE), ("json_object", None)]


def train_128k(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))

    def texts():
        for f in files:
            with open(f, "rb") as fh:
                yield fh.read().decode("utf-8", "replace")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=128000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(path)


def tokenizers_under_test(workdir: str, skip_128k: bool) -> dict:
    from model.tokenizer import HFTokenizer, load_tokenizer

    out = {"demo (SentencePiece, 4,096)": load_tokenizer("model/assets/demo", "sentencepiece")}
    if not skip_128k:
        path = os.path.join(workdir, "bpe128k.json")
        if not os.path.exists(path):
            t = time.perf_counter()
            train_128k(path)
            print(f"trained the 128k tokenizer in {time.perf_counter() - t:.0f} s -> {path}")
        with open(path) as f:
            out["byte-level BPE, 128,000"] = HFTokenizer(f.read(), {"bos": 0, "eos": 1})
    return out


def walk(automaton, steps: int, seed: int = 0) -> list[int]:
    """A valid token path through the automaton (uniform over allowed tokens, EOS excluded)."""
    rng, state, path = np.random.default_rng(seed), 0, []
    eos_class = automaton.num_classes - 1
    for _ in range(steps):
        allowed = automaton.allowed(state)
        allowed = allowed[automaton.token_class[allowed] != eos_class]
        if not allowed.size:
            break
        t = int(rng.choice(allowed))
        path.append(t)
        state = automaton.step(state, t)
    return path


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def median_timed(fn, *args, runs: int = 3):
    """fn's result and its median time over runs (the machine is shared and noisy)."""
    results = [timed(fn, *args) for _ in range(runs)]
    return results[-1][0], statistics.median(s for _, s in results)


def bench_outlines(tokenizer, kind, spec) -> tuple[dict, object]:
    from model import constraints

    def compile_uncached():
        constraints.cache_clear()
        return constraints.compile_constraint(kind, spec, tokenizer)

    auto, seconds = median_timed(compile_uncached)
    v = auto.vocab_size
    return {"compile_s": round(seconds, 3), "states": auto.num_states, "classes": auto.num_classes,
            "table_MB": round(auto.nbytes / 1e6, 3), "dense_MB": round(auto.num_states * v * 4 / 1e6, 1)}, auto


def xgrammar_info(tokenizer):
    import xgrammar

    tb = tokenizer.token_bytes()
    vocab = [b if b is not None else b"" for b in tb]
    return xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=len(vocab),
                                  stop_token_ids=[tokenizer.eos_id])


def bench_xgrammar(info, kind, spec, path) -> dict:
    import torch
    import xgrammar

    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    compile_fn = {"json_schema": lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True),
                  "regex": lambda: compiler.compile_regex(REGEX),
                  "choice": lambda: compiler.compile_regex("(" + "|".join(CHOICE) + ")"),
                  "json_object": lambda: compiler.compile_builtin_json_grammar()}[kind]
    compiled, seconds = median_timed(compile_fn)
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    return {"compile_s": round(seconds, 3), **_mask_times(lambda: matcher.fill_next_token_bitmask(bitmask),
                                                         matcher.accept_token, path)}


def llguidance_tokenizer(tokenizer, hf_json: str | None):
    import llguidance

    if hf_json is not None:
        return llguidance.LLTokenizer(hf_json, eos_token=tokenizer.eos_id)
    tb = tokenizer.token_bytes()

    class Wrapped:
        eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        tokens = [b if b is not None else b"\xff[special_%d]" % i for i, b in enumerate(tb)]
        special_token_ids = [i for i, b in enumerate(tb) if b is None]

        def __call__(self, text):
            return tokenizer.encode(text.decode() if isinstance(text, bytes) else text, add_bos=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))


def bench_llguidance(lltok, kind, spec, path) -> dict:
    import llguidance

    grammar = {"json_schema": lambda: llguidance.LLMatcher.grammar_from_json_schema(
                   SCHEMA, defaults={"whitespace_flexible": True}),
               "regex": lambda: llguidance.LLMatcher.grammar_from_regex(REGEX),
               "choice": lambda: llguidance.LLMatcher.grammar_from_regex("(" + "|".join(CHOICE) + ")"),
               "json_object": lambda: llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})}[kind]()
    seconds = median_timed(llguidance.LLMatcher, lltok, grammar)[1]
    matcher = llguidance.LLMatcher(lltok, grammar)
    if matcher.is_error():
        return {"compile_s": None, "error": matcher.get_error()}
    first_mask = timed(matcher.compute_bitmask)[1]  # the lexer is built lazily: its cost shows here
    matcher.reset()
    times = _mask_times(matcher.compute_bitmask, matcher.consume_token, path)
    return {"compile_s": round(seconds, 3), "first_mask_s": round(first_mask, 3), **times,
            **({"error": matcher.get_error()} if matcher.is_error() else {})}


def _mask_times(mask, accept, path) -> dict:
    times = []
    for t in path:
        times.append(timed(mask)[1])
        if not accept(t):
            break
    return {"mask_on_host_us": round(statistics.median(times) * 1e6, 1), "mask_steps": len(times)}


def bench_device_step(autos, vocab: int, batch: int = 32, runs: int = 20) -> dict:
    """A jitted step: argmax over masked logits and advance, against argmax alone, half the rows
    constrained; median over runs."""
    import jax
    import jax.numpy as jnp

    from model import constraints

    table, offsets = constraints.pack(autos, 4096, 512, 8, vocab_size=vocab)
    table = jax.device_put(table)
    constrained = jnp.arange(batch) % 2 == 0
    state = jnp.where(constrained, jnp.asarray(offsets)[jnp.arange(batch) % len(autos)], 0)
    logits = jax.random.normal(jax.random.key(0), (batch, vocab))

    plain = jax.jit(lambda lg, s: (jnp.argmax(lg, -1), s))

    @jax.jit
    def masked(lg, s):
        tok = jnp.argmax(constraints.mask_logits(lg, s, table, constrained), -1).astype(jnp.int32)
        return tok, constraints.advance(s, tok, table, constrained)

    out = {}
    for name, fn in (("argmax_us", plain), ("masked_argmax_us", masked)):
        jax.block_until_ready(fn(logits, state))
        times = [timed(lambda: jax.block_until_ready(fn(logits, state)))[1] for _ in range(runs)]
        out[name] = round(statistics.median(times) * 1e6, 1)
    out["table_MB"] = round(sum(np.asarray(x).nbytes for x in table) / 1e6, 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_constraints"))
    p.add_argument("--skip-128k", action="store_true")
    p.add_argument("--out", default="bench_constraints.json")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    result = {}
    for tok_name, tok in tokenizers_under_test(args.workdir, args.skip_128k).items():
        hf_json = tok._tok.to_str() if hasattr(tok, "_tok") else None
        from model import constraints

        ours_s = timed(constraints._vocab, tok)[1]  # token bytes and their hash, once per tokenizer
        setup_s = {"outlines-core": round(ours_s, 3)}
        others = {}  # library -> (its tokenizer, its bench function); only those installed
        for name, module, make, bench in (("xgrammar", "xgrammar", xgrammar_info, bench_xgrammar),
                                          ("llguidance", "llguidance", llguidance_tokenizer, bench_llguidance)):
            if importlib.util.find_spec(module) is None:
                print(f"{name} is not installed: skipped")
                continue
            made, setup_s[name] = timed(make, tok, *((hf_json,) if name == "llguidance" else ()))
            others[name] = (made, bench)
        rows, autos = {}, []
        for kind, spec in CONSTRAINTS:
            oc, auto = bench_outlines(tok, kind, spec)
            autos.append(auto)
            path = walk(auto, 40)
            rows[kind] = {"outlines-core": oc, **{name: bench(made, kind, spec, path)
                                                 for name, (made, bench) in others.items()}}
            print(tok_name, kind, json.dumps(rows[kind]))
        result[tok_name] = {"tokenizer_setup_s": {k: round(v, 3) for k, v in setup_s.items()},
                            "constraints": rows,
                            "device_step_cpu": bench_device_step(autos, autos[0].vocab_size)}
        print(tok_name, "setup", json.dumps(result[tok_name]["tokenizer_setup_s"]),
              "device step", json.dumps(result[tok_name]["device_step_cpu"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
