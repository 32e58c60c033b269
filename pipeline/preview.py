"""Notebook previews: generate for a few prompts in-process, no Beam.

    from pipeline.preview import generate
    generate(["Once upon a time", "The hacker"], max_tokens=40, temperature=0.8)
    for record in stream(prompts, max_tokens=40): ...   # each record as soon as it finishes
    for piece in stream_text("Once upon a time", max_tokens=40): print(piece, end="")  # as generated

or from a shell:  python -m pipeline.preview --model demo "Once upon a time"
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import queue
import sys
import time
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from model import Engine, SamplingParams, load_tokenizer, resolve_checkpoint
from model.tokenizer import decode_completions


@functools.lru_cache(maxsize=2)
def _engine(model: str, dtype: str, max_len: int | None, max_slots: int) -> Engine:
    engine = Engine.from_pretrained(model, mesh_shape=None, dtype=dtype, max_len=max_len, max_slots=max_slots)
    path = resolve_checkpoint(model)
    if os.path.isdir(path) or "://" in path:
        # the sentencepiece library runs a tokenizer.model with tensorflow-text's ids and text, and
        # spares a preview the seconds TensorFlow takes to import (tests/test_tokenizer.py)
        engine.tokenizer = load_tokenizer(path, sentencepiece_backend="sentencepiece")
    return engine


def generate(prompts: str | Sequence[str], model: str = "demo", max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
             dtype: str = "float32", max_len: int | None = None, max_slots: int = 16, progress: bool = True,
             as_dataframe: bool = False) -> list[dict[str, Any]] | Any:
    """Completions for `prompts`, one record per prompt, in order. The engine is cached between
    calls. `stop` strings cut the completion where they first appear (they are not included).
    The progress bar moves as each prompt finishes and shows completion tokens per second."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    records: list[dict[str, Any]] = [{}] * len(prompts)
    start, tokens = time.perf_counter(), 0
    with tqdm(total=len(prompts), disable=not progress, desc="generate", unit="prompt") as bar:
        for rec in stream(prompts, model, max_tokens, temperature, top_p, top_k, seed, stop, dtype, max_len,
                          max_slots):
            records[rec.pop("index")] = rec
            tokens += rec["completion_tokens"]
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tokens/s", refresh=False)
            bar.update(1)
    if as_dataframe:
        import pandas as pd

        return pd.DataFrame.from_records(records)
    return records


def stream(prompts: str | Sequence[str], model: str = "demo", max_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
           dtype: str = "float32", max_len: int | None = None, max_slots: int = 16) -> Iterator[dict[str, Any]]:
    """Yields each prompt's record as soon as it finishes, in finishing order; `record["index"]`
    is the prompt's position in `prompts`. Every prompt is in the engine's loop at once, so the
    short answers come first. Arguments as for `generate`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    engine = _engine(model, dtype, max_len, max_slots)
    if engine.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer; preview needs text in and out")
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop=tuple(stop))
    token_ids = engine.tokenizer.encode_batch(prompts)
    room = [max(1, min(max_tokens, engine.max_len - len(p))) for p in token_ids]
    futures = engine.submit(token_ids, [dataclasses.replace(sampling, max_new_tokens=r) for r in room])
    index = {f: i for i, f in enumerate(futures)}
    for f in concurrent.futures.as_completed(futures):
        i, out = index[f], f.result()
        [text] = decode_completions(engine.tokenizer, [token_ids[i]], [out.token_ids])
        reason = out.finish_reason
        cut = min((c for c in (text.find(s) for s in stop) if c >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        yield {"index": i, "prompt": prompts[i], "completion": text, "prompt_tokens": len(token_ids[i]),
               "completion_tokens": len(out.token_ids), "finish_reason": reason}


def stream_text(prompt: str, model: str = "demo", max_tokens: int = 64, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                dtype: str = "float32", max_len: int | None = None, max_slots: int = 16) -> Iterator[str]:
    """Yields one prompt's completion as it is generated: pieces of text that add up to
    `generate`'s completion for the same arguments (a piece arrives per decode dispatch of the
    engine, `decode_steps` tokens). The text up to a stop string, without it."""
    engine = _engine(model, dtype, max_len, max_slots)
    if engine.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer; preview needs text in and out")
    [ids] = engine.tokenizer.encode_batch([prompt])
    sampling = SamplingParams(max_new_tokens=max(1, min(max_tokens, engine.max_len - len(ids))),
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop))
    arrived: queue.Queue = queue.Queue()
    [future] = engine.submit([ids], sampling, on_tokens=lambda _, tokens: arrived.put(list(tokens)))
    future.add_done_callback(lambda _: arrived.put(None))
    tokens, sent = [], ""
    while (new := arrived.get()) is not None:
        tokens += new
        [text] = decode_completions(engine.tokenizer, [ids], [tokens])
        cut = min((c for c in (text.find(s) for s in stop) if c >= 0), default=-1)
        text = text[:cut] if cut >= 0 else text.rstrip("\ufffd")  # hold back a split UTF-8 character
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent):]
            sent = text
        if cut >= 0:
            break
    future.result()  # raises what failed it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.preview", description=__doc__.split("\n")[0])
    ap.add_argument("prompts", nargs="+", help="one or more prompts")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--max_tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    try:
        records = generate(args.prompts, model=args.model, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed, dtype=args.dtype, progress=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        print(f"{r['prompt']}{r['completion']}\n  [{r['completion_tokens']} tokens, {r['finish_reason']}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
