"""Structured outputs in the engine and the job: constrained rows follow their automaton on the
device, unconstrained rows in the same batch are untouched, and records carry the constraints."""

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from model import Engine, SamplingParams
from model.config import ModelConfig
from model.constraints import TableManager, compile_constraint
from model.engine import random_params, resolve_checkpoint
from model.sharding import make_mesh
from model.tokenizer import load_tokenizer
from model.weights import read_hf_config

DEMO = resolve_checkpoint("demo")
SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["positive", "negative", "neutral"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 9},
    "reason": {"type": "string", "maxLength": 20}}, "required": ["label", "score", "reason"]}
REGEX = r"[A-Z][a-z]{2,6}-[0-9]{3}"
CHOICES = ["yes", "no", "maybe not"]


@pytest.fixture(scope="module")
def demo():
    return Engine.from_pretrained("demo", max_slots=8, max_len=256, dtype="float32")


@pytest.fixture(scope="module")
def random_demo_shape():
    """The demo's shape and tokenizer with random weights: a near-uniform model, so sampled rows
    wander everywhere the automaton allows."""
    cfg = ModelConfig.from_hf_config(read_hf_config(DEMO))
    mesh = make_mesh(None)
    return Engine(cfg, random_params(cfg, jnp.float32, mesh, seed=3), mesh, tokenizer=load_tokenizer(DEMO),
                  max_slots=8, max_len=256)


def text_of(engine, out):
    eos = set(engine.cfg.eos_token_ids)
    return engine.tokenizer.decode([t for t in out.token_ids if t not in eos])


def check(engine, kind, spec, out):
    """A complete output is valid; an incomplete one says so and ended for length."""
    text = text_of(engine, out)
    if not out.constraint_satisfied:
        assert out.finish_reason == "length", (text, out)
        return False
    assert out.finish_reason == "stop"
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    else:
        assert text in spec, text
    return True


@pytest.mark.parametrize("kind, spec", [("json_schema", SCHEMA), ("regex", REGEX), ("choice", CHOICES)])
@pytest.mark.parametrize("model", ["demo", "random_demo_shape"])
def test_every_output_follows_its_constraint_greedy_and_sampled(kind, spec, model, request):
    engine = request.getfixturevalue(model)
    constraint = engine.constraint(kind, spec)
    prompts = [engine.tokenizer.encode(t) for t in ["Review: a fine film. Verdict:", "And God said", "The hacker",
                                                    "In the beginning", "Label this:"]] * 4
    sampling = [SamplingParams(max_new_tokens=64, constraint=constraint, temperature=0.0 if i < 5 else 1.0,
                               top_p=1.0 if i % 2 else 0.9, seed=i) for i in range(len(prompts))]
    outs = engine.generate(prompts, sampling)
    complete = sum(check(engine, kind, spec, o) for o in outs)
    assert complete >= len(outs) * 3 // 4, f"only {complete} of {len(outs)} outputs completed in 64 tokens"


def test_unconstrained_rows_beside_constrained_ones_are_untouched(demo):
    prompts = [demo.tokenizer.encode(t) for t in ["And God said", "The hacker", "In the beginning", "A kludge"]]
    plain = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.8, seed=5)]
    alone = demo.generate(prompts[:2], plain)
    c = demo.constraint("choice", CHOICES)
    mixed = demo.generate(prompts, plain + [SamplingParams(max_new_tokens=8, constraint=c)] * 2)
    for a, m in zip(alone, mixed[:2]):
        assert a.token_ids == m.token_ids and a.constraint_satisfied is m.constraint_satisfied is None
        np.testing.assert_allclose(a.logprobs, m.logprobs, rtol=1e-5, atol=1e-6)
    assert all(text_of(demo, o) in CHOICES for o in mixed[2:])


def test_logprobs_are_the_models_own_under_a_constraint(demo):
    [out] = demo.generate([demo.tokenizer.encode("The hacker")],
                          SamplingParams(max_new_tokens=12, constraint=demo.constraint("regex", REGEX)))
    prompt = demo.tokenizer.encode("The hacker")
    logits = demo.logits([prompt + out.token_ids])[0]
    full = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = [full[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, want, rtol=1e-4, atol=1e-4)


def test_the_table_repacks_and_grows_while_rows_run():
    """A table with room for 2 small automata: new constraints evict unused ones (states move,
    running rows are remapped), and one bigger than the table grows it."""
    engine = Engine.from_pretrained("demo", max_slots=4, max_len=128, constraint_states=64, constraint_classes=64,
                                    constraint_automata=2)
    tok = engine.tokenizer
    specs = [("choice", ["alpha", "beta"]), ("choice", ["gamma", "delta"]), ("regex", "[0-9]{4}"),
             ("choice", ["one", "two", "three"]), ("json_schema", SCHEMA)]
    prompts, sampling = [], []
    for i in range(12):
        kind, spec = specs[i % len(specs)]
        prompts.append(tok.encode(f"Item {i}:"))
        sampling.append(SamplingParams(max_new_tokens=48 if kind == "json_schema" else 12 + i,
                                       constraint=engine.constraint(kind, spec), temperature=0.7, seed=i))
    outs = engine.generate(prompts, sampling)
    for i, out in enumerate(outs):
        kind, spec = specs[i % len(specs)]
        if kind != "json_schema":
            assert check(engine, kind, spec, out), (i, text_of(engine, out))
        else:
            check(engine, kind, spec, out)
    assert engine._constraints.capacity[0] >= compile_constraint("json_schema", SCHEMA, tok, engine.cfg.eos_token_ids,
                                                                 engine.cfg.vocab_size).num_states


def test_table_manager_keeps_rows_in_use_and_remaps_them(demo):
    tok = demo.tokenizer
    a, b, c = (compile_constraint("choice", [w, w + "s"], tok, (2,)) for w in ("cat", "dog", "bird"))
    m = TableManager(tok.vocab_size, states=a.num_states + b.num_states, classes=64, automata=2)
    (oa, ob), remap = m.offsets([a, b], [])
    assert remap is None and oa == 0 and ob == a.num_states
    [oc], remap = m.offsets([c], in_use=[b])  # a is dropped, b moves to the front
    assert remap is not None and remap[ob + 1] == 1 and oc == b.num_states
    assert m.offsets([b], [b, c]) == ([0], None)


def test_the_tpu_path_follows_constraints_as_the_cpu_path_does():
    cpu = Engine.from_pretrained("demo", max_slots=4, max_len=128, dtype="float32")
    tpu = Engine.from_pretrained("demo", max_slots=4, max_len=128, dtype="float32", hot_path="tpu")
    prompts = [cpu.tokenizer.encode(t) for t in ["Review: bad. Verdict:", "The hacker"]]
    for kind, spec in (("json_schema", SCHEMA), ("regex", REGEX)):
        want = cpu.generate(prompts, SamplingParams(max_new_tokens=40, constraint=cpu.constraint(kind, spec)))
        got = tpu.generate(prompts, SamplingParams(max_new_tokens=40, constraint=tpu.constraint(kind, spec)))
        assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_bad_constraints_are_clear_errors(demo):
    with pytest.raises(ValueError, match="regex"):
        demo.constraint("regex", "(unclosed")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, constraint=demo.constraint("choice", CHOICES))
    with pytest.raises(ValueError, match="TokenAutomaton"):
        SamplingParams(constraint={"type": "json_object"})
    with pytest.raises(ValueError, match="tokenizer"):
        Engine.from_pretrained("tiny-llama", max_slots=2, max_len=64).constraint("choice", CHOICES)


def test_integer_bounds_become_enums_and_unenforceable_keywords_are_refused(demo):
    auto = demo.constraint("json_schema", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3,
                                                                                   "exclusiveMaximum": 6}},
                                           "required": ["n"]})
    assert "3|4|5" in auto.regex.replace("(", "").replace(")", "") or all(str(v) in auto.regex for v in (3, 4, 5))
    for schema, words in [({"type": "number", "minimum": 0}, "'minimum' at schema"),
                          ({"type": "integer", "minimum": 0}, "needs both bounds"),
                          ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
                          ({"type": "object", "properties": {"a": {"type": "integer", "maximum": 9,
                                                                   "minimum": -9999}}}, "schema.properties.a")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            demo.constraint("json_schema", schema)


def test_a_job_returns_valid_structured_records_and_refuses_bad_ones_alone(tmp_path):
    from pipeline.job import run

    inp = tmp_path / "in.jsonl"
    recs = [{"id": "schema", "prompt": "Review: loved it. JSON:", "max_tokens": 80,
             "response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}}},
            {"id": "guided", "prompt": "Review: awful. JSON:", "max_tokens": 80, "guided_json": json.dumps(SCHEMA)},
            {"id": "regex", "prompt": "Code:", "guided_regex": REGEX, "temperature": 0.9},
            {"id": "choice", "prompt": "Answer:", "guided_choice": CHOICES},
            {"id": "object", "prompt": "JSON:", "max_tokens": 2, "response_format": {"type": "json_object"}},
            {"id": "bad-regex", "prompt": "Code:", "guided_regex": "(unclosed"},
            {"id": "bad-schema", "prompt": "x", "guided_json": {"type": "number", "maximum": 3}},
            {"id": "plain", "prompt": "In the beginning", "max_tokens": 5}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    api = tmp_path / "api.jsonl"
    api.write_text(json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {
        "prompt": "Label: great. JSON:", "max_tokens": 80,
        "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": SCHEMA}}}}) + "\n")
    run(["--input", str(inp), "--output", str(tmp_path / "out"), "--model", "demo", "--max_len", "256"])
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "in.jsonl").read_text().splitlines())}
    for rid in ("schema", "guided"):
        assert out[rid]["constraint_satisfied"] is True, out[rid]
        jsonschema.validate(json.loads(out[rid]["completion"]), SCHEMA)
    assert re.fullmatch(REGEX, out["regex"]["completion"]) and out["choice"]["completion"] in CHOICES
    assert out["object"]["finish_reason"] == "length" and out["object"]["constraint_satisfied"] is False
    assert out["bad-regex"]["error"]["type"] == "invalid_parameter" and "guided_regex" in out["bad-regex"]["error"][
        "message"]
    assert out["bad-schema"]["error"]["type"] == "invalid_parameter" and "maximum" in out["bad-schema"]["error"][
        "message"]
    assert "constraint_satisfied" not in out["plain"] and out["plain"]["completion_tokens"] == 5
    run(["--input", str(api), "--output", str(tmp_path / "out2"), "--model", "demo", "--max_len", "256"])
    [answer] = map(json.loads, (tmp_path / "out2" / "api.jsonl").read_text().splitlines())
    body = answer["response"]["body"]
    assert answer["response"]["status_code"] == 200 and body["choices"][0]["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(body["choices"][0]["text"]), SCHEMA)
