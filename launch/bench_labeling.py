"""Structured outputs in the engine, measured (issue 12): validity and what constraints cost.

On the demo model, in one run, over the same labeling prompts (an instruction prefix + a text):
  validity  how many of --records outputs parse and validate against the labeling schema, constrained
            (response_format json_schema) and unconstrained (the same prompts, free text), and each
            run's generated tokens/s (constrained rows end when their JSON does, so lengths differ)
  cost      the same records with every row generating exactly --cost_tokens (ignore_eos, or a
            constraint that cannot end sooner), with none, half or all of the rows masked: the
            throughput the masks cost, at equal work (medians of --repeats)
  scoring   score_choices with 8 labels per record (Engine.score: the prompt and its labels in one
            packed row) against a single prefill of the same prompts (generation of 1 token),
            medians of --repeats
The engine is warm (every function compiled first).

    python -m launch.bench_labeling                     # ~5 minutes on 2 CPU cores; writes bench_labeling.json
    python -m launch.bench_labeling --records 200 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jsonschema

from model import Engine, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["positive", "negative", "neutral"]},
    "confidence": {"type": "integer", "minimum": 1, "maximum": 5},
    "reason": {"type": "string", "maxLength": 40}},
    "required": ["label", "confidence", "reason"]}
PREFIX = "Label the text as positive, negative or neutral. Answer in JSON.\nText: "
SUBJECTS = ["The hacker", "The network", "A kludge", "The wizard", "The manual", "The compiler", "The server",
            "The new release", "The build", "The programmer"]
PREDICATES = ["fixed the bug before dawn", "went down again", "is holding everything together",
              "looked at the code and wept", "says to reboot the machine", "crashed at midnight",
              "is fast and a joy to use", "was quiet all night", "broke every week", "wrote the tests first"]


def prompts(n: int) -> list[str]:
    return [f"{PREFIX}{SUBJECTS[i % 10]} {PREDICATES[(i // 10) % 10]} (case {i})\nJSON:" for i in range(n)]


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def timed(engine: Engine, ids, sampling) -> tuple[float, int, list]:
    """(seconds, generated tokens, outputs) of one generate call."""
    start = time.perf_counter()
    outs = engine.generate(ids, sampling)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs), outs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1000, help="records of the validity run")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--cost_records", type=int, default=128, help="records of each cost run")
    p.add_argument("--cost_tokens", type=int, default=64, help="tokens every row of a cost run generates")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--score_records", type=int, default=256, help="records of each scoring run")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--json", default="bench_labeling.json")
    args = p.parse_args(argv)

    engine = Engine.from_pretrained("demo", max_slots=32, max_len=256, dtype="float32")
    tok, eos = engine.tokenizer, set(engine.cfg.eos_token_ids)
    ids = [tok.encode(t) for t in prompts(args.records)]
    start = time.perf_counter()
    schema = engine.constraint("json_schema", SCHEMA)
    compile_s = time.perf_counter() - start
    # never complete within cost_tokens, so every row of a cost run generates exactly cost_tokens
    endless = engine.constraint("regex", f"([a-z]+ ){{{args.cost_tokens},}}")
    engine.warmup()

    # 1. validity, and tokens/s as a labeling job sees it (constrained rows end when their JSON does)
    free = [SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=i)
            for i in range(len(ids))]
    runs = {"unconstrained": free, "schema on every row": [dataclasses.replace(sp, constraint=schema) for sp in free]}
    validity_runs = {}
    for name, sp in runs.items():
        seconds, tokens, outs = timed(engine, ids, sp)
        texts = [tok.decode([t for t in o.token_ids if t not in eos]) for o in outs]
        validity_runs[name] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                               "valid": sum(map(valid, texts)), "complete": sum(bool(o.constraint_satisfied)
                                                                                for o in outs),
                               "examples": texts[:3]}

    # 2. cost at equal lengths: no row ends early, so the runs differ only in the masks
    cost_ids = ids[:args.cost_records]
    fixed = SamplingParams(max_new_tokens=args.cost_tokens, temperature=args.temperature, ignore_eos=True)
    masked = SamplingParams(max_new_tokens=args.cost_tokens, temperature=args.temperature, constraint=endless)
    cost_runs = {"none": [fixed] * len(cost_ids), "half": [masked if i % 2 else fixed for i in range(len(cost_ids))],
                 "all": [masked] * len(cost_ids)}
    cost = {name: [] for name in cost_runs}
    for _ in range(args.repeats):
        for name, sp in cost_runs.items():
            seconds, tokens, _ = timed(engine, cost_ids, sp)
            assert tokens == len(cost_ids) * args.cost_tokens, tokens
            cost[name].append(seconds)
    med = {name: statistics.median(v) for name, v in cost.items()}

    # 3. label scoring against one prefill of the prompt
    score_texts = prompts(args.score_records)
    score_ids = ids[:args.score_records] if args.score_records <= len(ids) else [tok.encode(t) for t in score_texts]
    labels = ["positive", "negative", "neutral", "mixed", "angry", "happy", "sad", "unclear"]
    cands = []
    for text, p_ids in zip(score_texts, score_ids):
        joined = tok.encode_batch([f"{text} {label}" for label in labels])
        cands.append([j[len(p_ids):] for j in joined])
    one_token = SamplingParams(max_new_tokens=1)
    engine.score(score_ids, cands), engine.generate(score_ids, one_token)  # compile both
    scoring = {"score 8 labels": [], "prefill (1 token)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine.score(score_ids, cands)
        scoring["score 8 labels"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.generate(score_ids, one_token)
        scoring["prefill (1 token)"].append(time.perf_counter() - start)
    score_med = {k: statistics.median(v) for k, v in scoring.items()}
    label_tokens = statistics.mean(sum(map(len, c)) for c in cands)
    prompt_tokens = statistics.mean(map(len, score_ids))
    ratios = {"validity_run_tokens_per_s_schema_vs_unconstrained":
              validity_runs["schema on every row"]["tokens_per_s"] / validity_runs["unconstrained"]["tokens_per_s"],
              "equal_length_all_rows_masked_throughput_vs_none": med["none"] / med["all"],
              "equal_length_half_rows_masked_throughput_vs_none": med["none"] / med["half"],
              "score_8_labels_vs_prefill": score_med["score 8 labels"] / score_med["prefill (1 token)"]}
    result = {"args": vars(args), "schema_compile_s": compile_s, "validity": validity_runs,
              "cost_seconds": cost, "cost_median_s": med, "scoring_seconds": scoring, "scoring_median_s": score_med,
              "scoring_prompt_tokens_mean": prompt_tokens, "scoring_label_tokens_mean": label_tokens,
              "ratios": ratios}

    print(f"labeling schema compiled in {compile_s:.3f} s; temperature {args.temperature}")
    print(f"validity run: {args.records} records, max_tokens {args.max_tokens}")
    print(f"  {'run':<22}{'valid':>12}{'complete':>10}{'tokens':>8}{'tokens/s':>10}")
    for name, r in validity_runs.items():
        print(f"  {name:<22}{r['valid']:>7}/{args.records:<4}{r['complete']:>10}{r['tokens']:>8}"
              f"{r['tokens_per_s']:>10.0f}")
    print(f"cost runs: {len(cost_ids)} records x exactly {args.cost_tokens} tokens, medians of {args.repeats}")
    for name in cost_runs:
        print(f"  rows masked: {name:<5} {med[name]:7.2f} s   throughput vs none {med['none'] / med[name]:.2f}x")
    print(f"scoring: {len(score_ids)} records, prompts of {prompt_tokens:.0f} tokens on average, 8 labels of "
          f"{label_tokens:.1f} tokens together, medians of {args.repeats}")
    for name, v in score_med.items():
        print(f"  {name:<18} {v:7.2f} s")
    print(f"targets: scoring 8 labels <= 1.5x a prefill ({ratios['score_8_labels_vs_prefill']:.2f}x); schema on every row >= 0.7x ({ratios['equal_length_all_rows_masked_throughput_vs_none']:.2f}x at "
          f"equal lengths; {ratios['validity_run_tokens_per_s_schema_vs_unconstrained']:.2f}x tokens/s in the "
          f"validity run), half the rows >= 0.95x ({ratios['equal_length_half_rows_masked_throughput_vs_none']:.2f}x)")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
