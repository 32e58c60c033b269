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
@pytest.mark.parametrize("model", ["demo", pytest.param("random_demo_shape", marks=pytest.mark.slow)])
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


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
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


@pytest.mark.slow
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


def full_logprobs(engine, prompt, completion):
    logits = engine.logits([prompt + completion])[0].astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)


def test_top_logprobs_equal_a_full_forwards_top_k(demo):
    prompts = [demo.tokenizer.encode(t) for t in ["The hacker", "And God said unto"]]
    sampling = [SamplingParams(max_new_tokens=20, top_logprobs=5),
                SamplingParams(max_new_tokens=12, top_logprobs=20, temperature=0.9, seed=2)]
    outs = demo.generate(prompts + prompts[:1], sampling + [SamplingParams(max_new_tokens=4)])
    assert outs[2].top_logprobs is None
    for p, sp, out in zip(prompts, sampling, outs):
        assert len(out.top_logprobs) == len(out.token_ids)
        full = full_logprobs(demo, p, out.token_ids)
        for i, alts in enumerate(out.top_logprobs):
            row = full[len(p) - 1 + i]
            assert len(alts) == sp.top_logprobs
            np.testing.assert_allclose([lp for _, lp in alts], np.sort(row)[::-1][:sp.top_logprobs], atol=2e-4)
            np.testing.assert_allclose([row[t] for t, _ in alts], [lp for _, lp in alts], atol=2e-4)
        if sp.temperature == 0:  # greedy: the chosen token is the top one
            assert [alts[0][0] for alts in out.top_logprobs] == out.token_ids
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)


def test_top_logprobs_in_records_and_openai_answers(tmp_path):
    from pipeline.job import run

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "The hacker", "max_tokens": 4,
                                                   "top_logprobs": 3}) + "\n")
    (tmp_path / "api.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The hacker", "max_tokens": 4, "logprobs": 2}}]))
    run(["--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "out"), "--model", "demo",
         "--max_len", "128"])
    [rec] = map(json.loads, (tmp_path / "out" / "in.jsonl").read_text().splitlines())
    assert len(rec["top_logprobs"]) == 4 and all(len(alts) == 3 for alts in rec["top_logprobs"])
    assert {"token", "id", "logprob"} == set(rec["top_logprobs"][0][0])
    [answer] = map(json.loads, (tmp_path / "out" / "api.jsonl").read_text().splitlines())
    lp = answer["response"]["body"]["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 4 and all(2 <= len(alts) <= 3 for alts in lp["top_logprobs"])
    assert all(lp["tokens"][i] in alts for i, alts in enumerate(lp["top_logprobs"]))


@pytest.mark.parametrize("hot_path", ["cpu", "tpu"])
def test_scores_equal_log_probabilities_from_a_full_forward(hot_path):
    engine = Engine.from_pretrained("demo", max_slots=4, max_len=128, dtype="float32", hot_path=hot_path)
    tok = engine.tokenizer
    prompts = [tok.encode(t) for t in ["Label the text: the build broke again. Label:", "And God said", "x"]]
    cands = [[tok.encode(w, add_bos=False) for w in (" positive", " negative", " neutral", " mixed feelings")],
             [tok.encode(w, add_bos=False) for w in (" Let there be light", " unto Moses")],
             [[5], [6, 7], [8, 9, 10]]]
    outs = engine.score(prompts, cands)
    for p, cs, out in zip(prompts, cands, outs):
        want = []
        for c in cs:
            full = full_logprobs(engine, p, c)
            want.append(sum(full[len(p) - 1 + i, t] for i, t in enumerate(c)))
        np.testing.assert_allclose(out.scores, want, rtol=1e-4, atol=1e-3)
        assert out.best == int(np.argmax(want)) and out.prompt_len == len(p)
    with pytest.raises(ValueError, match="candidates must be a non-empty list"):
        engine.score(prompts[:1], [[]])
    with pytest.raises(ValueError, match="max_len"):
        engine.score(prompts[:1], [[[5] * 120]])


def test_score_choices_records_return_each_labels_log_probability(tmp_path):
    from pipeline.job import run

    labels = ["positive", "negative", "neutral"]
    recs = [{"id": "a", "prompt": "Label the text: the build broke again.\nLabel:", "score_choices": labels},
            {"id": "b", "prompt": "And God said", "score_choices": [" Let there be light", " unto Moses"]},
            {"id": "dup", "prompt": "x", "score_choices": ["a", "a"]},
            {"id": "both", "prompt": "x", "score_choices": ["a"], "guided_choice": ["a"]},
            {"id": "long", "prompt": "x", "score_choices": ["word " * 200]},
            {"id": "gen", "prompt": "In the beginning", "max_tokens": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--model", "demo",
         "--max_len", "128", "--dtype", "float32"])
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "in.jsonl").read_text().splitlines())}
    engine = Engine.from_pretrained("demo", max_slots=2, max_len=128, dtype="float32")
    tok = engine.tokenizer
    for rid in ("a", "b"):
        rec = next(r for r in recs if r["id"] == rid)
        assert set(out[rid]) == {"id", "label", "scores", "prompt_tokens"}
        assert list(out[rid]["scores"]) == rec["score_choices"]
        assert out[rid]["label"] == max(out[rid]["scores"], key=out[rid]["scores"].get)
        prompt = tok.encode(rec["prompt"])
        for label, got in out[rid]["scores"].items():  # the label as it continues the prompt's text
            ids = tok.encode(rec["prompt"] + label)
            assert ids[:len(prompt)] == prompt
            full = full_logprobs(engine, prompt, ids[len(prompt):])
            want = sum(full[len(prompt) - 1 + i, t] for i, t in enumerate(ids[len(prompt):]))
            assert got == pytest.approx(want, abs=1e-3)
    assert out["dup"]["error"]["type"] == "invalid_parameter" and "duplicates" in out["dup"]["error"]["message"]
    assert out["both"]["error"]["type"] == "invalid_parameter"
    assert out["long"]["error"]["type"] == "prompt_too_long"
    assert out["gen"]["completion_tokens"] == 3


def test_prompt_logprobs_equal_a_full_forward(demo, tmp_path):
    prompts = [demo.tokenizer.encode(t) for t in ["The hacker in the house", "And God said unto Moses, go forth", "A"]]
    got = demo.prompt_logprobs(prompts)
    for p, lps in zip(prompts, got):
        full = full_logprobs(demo, p[:1], p[1:])
        assert lps[0] is None and len(lps) == len(p)
        np.testing.assert_allclose(lps[1:], [full[i, t] for i, t in enumerate(p[1:])], atol=1e-4)
    from pipeline.job import run

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "The hacker", "max_tokens": 2,
                                                   "prompt_logprobs": 0}) + "\n"
                                       + json.dumps({"id": "b", "prompt": "x", "prompt_logprobs": 3}) + "\n")
    run(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--model", "demo",
         "--max_len", "128", "--dtype", "float32"])
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "in.jsonl").read_text().splitlines())}
    p = demo.tokenizer.encode("The hacker")
    assert out["a"]["prompt_logprobs"][0] is None and len(out["a"]["prompt_logprobs"]) == len(p)
    np.testing.assert_allclose(out["a"]["prompt_logprobs"][1:], demo.prompt_logprobs([p])[0][1:], atol=1e-4)
    assert out["b"]["error"]["type"] == "unsupported_parameter"
