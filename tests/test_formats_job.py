"""Every input format through the job on the demo model: the same prompt gives the same completion
whatever its format; chat through a checkpoint's template; stop strings, logprobs; seeds that do
not depend on sharding or batching."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import Engine, SamplingParams
from model.chat_template import load_chat_template
from model.tokenizer import decode_completions
from pipeline.job import run
from pipeline.records import token_texts
from test_formats import write_tfrecord

DEMO = "model/assets/demo"
PROMPTS = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is"]
CHAT = [{"role": "system", "content": "Answer as the Jargon File would."},
        {"role": "user", "content": "What is a hacker?"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>\n{{ m.content | trim }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>\n{% endif %}")


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def job(tmp_path, model, *extra, inp="in", out="out") -> dict:
    return run(["--input", str(tmp_path / inp / "*"), "--output", str(tmp_path / out), "--model", model,
                "--dtype", "float32", "--max_len", "256", "--max_tokens", "12", *extra])


def oa_line(cid, url, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"model": "any", **body}}) + "\n"


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """The demo model plus a tokenizer_config.json that holds a chat template."""
    d = tmp_path_factory.mktemp("chat_ckpt")
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        os.symlink(os.path.abspath(os.path.join(DEMO, name)), d / name)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": TEMPLATE}))
    return str(d)


@pytest.fixture(scope="module")
def engine(chat_checkpoint):
    return Engine.from_pretrained(chat_checkpoint, mesh_shape=None, dtype="float32", max_len=256)


def greedy(engine, ids_list, n=12):
    outs = engine.generate(ids_list, SamplingParams(max_new_tokens=n))
    return outs, decode_completions(engine.tokenizer, ids_list, [o.token_ids for o in outs])


def split_stop(engine, prompt_ids, completion_ids) -> tuple[str, int]:
    """A stop string that spans two tokens of the completion, and the index of the second token."""
    pieces = token_texts(engine.tokenizer, [prompt_ids], [completion_ids])[0]
    for k in range(1, len(pieces)):
        a, b = pieces[k - 1], pieces[k]
        stop = a[-1:] + b[:2]
        first = "".join(pieces).find(stop)
        if len(a) > 1 and len(b) > 1 and stop.strip() == stop and first == len("".join(pieces[:k])) - 1:
            return stop, k
    raise AssertionError(f"no stop string spanning two tokens in {pieces}")


def test_every_format_gives_the_same_completions(tmp_path, chat_checkpoint, engine):
    ids = engine.tokenizer.encode_batch(PROMPTS)
    outs, texts = greedy(engine, ids)
    chat_text = load_chat_template(chat_checkpoint).render(CHAT)
    chat_ids = engine.tokenizer.encode_batch([chat_text], add_bos=False, parse_special=True)[0]
    assert chat_ids[0] == engine.tokenizer.bos_id and chat_ids.count(engine.tokenizer.bos_id) == 1
    (chat_out,), (chat_completion,) = greedy(engine, [chat_ids])
    stop, k = split_stop(engine, ids[1], outs[1].token_ids)
    cut = texts[1].index(stop)

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "ours.jsonl").write_text(
        "".join(json.dumps({"id": f"j{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
        + json.dumps({"id": "chat", "messages": CHAT, "logprobs": True}) + "\n"
        + json.dumps({"id": "stop", "prompt": PROMPTS[1], "stop": [stop], "logprobs": True}) + "\n"
        + json.dumps({"id": "stop-incl", "prompt": PROMPTS[1], "stop": stop, "include_stop_str_in_output": True})
        + "\n")
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(4)], "text": PROMPTS,
                             "logprobs": [True, None, None, None]}), inp / "rows.parquet")
    write_tfrecord(inp / "ex.tfrecord", [{"id": f"t{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    (inp / "notes.txt").write_text("\n".join(PROMPTS) + "\n")
    (inp / "batch.jsonl").write_text(
        oa_line("c0", "/v1/completions", prompt=PROMPTS[0], max_tokens=12, logprobs=0)
        + oa_line("c1", "/v1/completions", prompt=PROMPTS[1], stop=[stop])
        + oa_line("m0", "/v1/chat/completions", messages=CHAT, max_completion_tokens=12, logprobs=True)
        + "{broken\n"
        + oa_line("bad", "/v1/completions", prompt=PROMPTS[0], top_p=0))
    job(tmp_path, chat_checkpoint, "--prompt_column", "text", "--id_column", "key", "--batch_tokens", "60")
    out = {p.name: read_out(p) for p in (tmp_path / "out").glob("*.jsonl")}
    assert sorted(out) == ["batch.jsonl", "ex.jsonl", "notes.jsonl", "ours.jsonl", "rows.jsonl"]

    # the same prompt, the same completion, in every format; ids and order as in the input
    assert [r["completion"] for r in out["ours.jsonl"][:4]] == texts
    assert [(r["id"], r["completion"]) for r in out["rows.jsonl"]] == [(f"p{i}", t) for i, t in enumerate(texts)]
    assert [(r["id"], r["completion"]) for r in out["ex.jsonl"]] == [(f"t{i}", t) for i, t in enumerate(texts)]
    assert [(r["id"], r["completion"]) for r in out["notes.jsonl"]] == [
        (f"notes.txt:{i + 1}", t) for i, t in enumerate(texts)]

    # logprobs: the engine's, one per completion token; asked for per record
    row = out["rows.jsonl"][0]
    assert row["logprobs"] == pytest.approx(outs[0].logprobs, abs=1e-4) and len(row["logprobs"]) == 12
    assert "logprobs" not in out["rows.jsonl"][1]

    # chat: the template's prompt, tokenized as HF does
    chat = out["ours.jsonl"][4]
    assert (chat["completion"], chat["prompt_tokens"]) == (chat_completion, len(chat_ids))
    assert chat["logprobs"] == pytest.approx(chat_out.logprobs, abs=1e-4)

    # a stop string split across two tokens: cut there; tokens and logprobs through the one completing it
    s, incl = out["ours.jsonl"][5], out["ours.jsonl"][6]
    assert (s["completion"], s["finish_reason"], s["completion_tokens"]) == (texts[1][:cut], "stop", k + 1)
    assert s["logprobs"] == pytest.approx(outs[1].logprobs[:k + 1], abs=1e-4)
    assert incl["completion"] == texts[1][:cut + len(stop)] and incl["completion_tokens"] == k + 1

    # OpenAI in, OpenAI out
    c0, c1, m0, broken, bad = out["batch.jsonl"]
    body = c0["response"]["body"]
    assert c0["custom_id"] == "c0" and c0["error"] is None and c0["response"]["status_code"] == 200
    assert body["object"] == "text_completion" and body["model"] == os.path.basename(chat_checkpoint)
    assert body["choices"][0]["text"] == texts[0] and body["choices"][0]["finish_reason"] == outs[0].finish_reason
    assert body["usage"] == {"prompt_tokens": len(ids[0]), "completion_tokens": 12, "total_tokens": len(ids[0]) + 12}
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == texts[0] and lp["token_logprobs"] == pytest.approx(outs[0].logprobs, abs=1e-4)
    assert c1["response"]["body"]["choices"][0]["text"] == texts[1][:cut]
    assert c1["response"]["body"]["choices"][0]["logprobs"] is None
    choice = m0["response"]["body"]["choices"][0]
    assert m0["response"]["body"]["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": chat_completion}
    assert [c["logprob"] for c in choice["logprobs"]["content"]] == pytest.approx(chat_out.logprobs, abs=1e-4)
    assert broken["custom_id"] is None and broken["error"]["code"] == "invalid_json"
    assert bad["response"]["status_code"] == 400 and "top_p" in bad["response"]["body"]["error"]["message"]


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_seeded_sampling_is_the_same_whatever_the_sharding_and_batching(tmp_path):
    recs = [{"id": f"r{i}", "prompt": PROMPTS[i % 4], "temperature": 0.9} for i in range(10)]
    recs.append({"id": "chat", "messages": CHAT})  # the demo checkpoint has no chat template
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "one" / "oa.jsonl").write_text(oa_line("m", "/v1/chat/completions", messages=CHAT))
    (tmp_path / "three").mkdir()
    for s in range(3):  # other shards, other neighbours, other order within a shard
        part = [r for i, r in enumerate(recs) if i % 3 == s][::-1]
        (tmp_path / "three" / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    job(tmp_path, "demo", "--batch_tokens", "40", inp="one", out="out1")
    job(tmp_path, "demo", "--batch_tokens", "100000", inp="three", out="out3")
    one = {r["id"]: r for r in read_out(tmp_path / "out1" / "all.jsonl")}
    three = {r["id"]: r for s in range(3) for r in read_out(tmp_path / "out3" / f"part-{s}.jsonl")}
    assert one == three and len(one) == 11
    assert len({one[f"r{i}"]["completion"] for i in (0, 4, 8)}) == 3  # same prompt, other id: other sample
    assert one["chat"]["error"]["type"] == "chat_template_missing"
    [oa] = read_out(tmp_path / "out1" / "oa.jsonl")
    assert oa["response"]["status_code"] == 400
    assert oa["response"]["body"]["error"]["code"] == "chat_template_missing"


def test_a_stop_string_ends_generation_early_and_the_job_output_is_unchanged(tmp_path, chat_checkpoint, engine):
    """The engine ends a sequence at the dispatch whose text completes a stop string, instead of
    running to max_tokens; the job's cut text is the same as when the stop was found afterwards."""
    ids = engine.tokenizer.encode_batch(PROMPTS[:2])
    full, _ = greedy(engine, ids, n=48)
    stop, k = split_stop(engine, ids[1], full[1].token_ids[:16])
    early = engine.generate(ids, [SamplingParams(max_new_tokens=48), SamplingParams(max_new_tokens=48, stop=(stop,))])
    assert early[0].token_ids == full[0].token_ids  # a row without stop strings runs on
    got = early[1].token_ids
    assert early[1].finish_reason == "stop" and got == full[1].token_ids[:len(got)]
    assert k < len(got) < len(full[1].token_ids)  # at most one dispatch past the stop, then freed
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "s", "prompt": PROMPTS[1], "stop": [stop],
                                                         "max_tokens": 48}) + "\n")
    job(tmp_path, chat_checkpoint, "--max_tokens", "48")
    [rec] = read_out(tmp_path / "out" / "a.jsonl")
    text = decode_completions(engine.tokenizer, [ids[1]], [full[1].token_ids])[0]
    assert rec["completion"] == text[:text.index(stop)] and rec["finish_reason"] == "stop"
