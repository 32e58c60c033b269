"""The run report, OUT/_report.html, and OUT/_metrics.prom: written by every job beside the manifest
and again by `python -m pipeline.report OUT`; the page is self-contained and shows the manifest's
numbers, the metrics file parses and holds them; neither failing fails the job."""

import json
import logging
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from model import Engine
from pipeline import handler, io, prometheus, report
from pipeline.job import run

MODEL_YAML = "checkpoint: demo\ndtype: float32\nmax_len: 128\nmax_slots: 8\nmesh_shape: [1, 1]\n"
PROMPTS = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is", "Blessed are the"]
SECTIONS = ("counts", "time", "throughput", "lengths", "errors", "config")


class Page(HTMLParser):
    """The parts of a page the tests look at: every tag with its attributes, section ids, the
    cards' (label, value) pairs, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.bars_per_svg: list[int] = []
        self.cards: dict[str, str] = {}
        self.text: list[str] = []
        self._card: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "svg":
            self.bars_per_svg.append(0)
        elif tag == "rect":
            self.bars_per_svg[-1] += 1
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self._card = []

    def handle_endtag(self, tag):
        if tag == "div" and self._card is not None:
            value, label = self._card
            self.cards[label] = value
            self._card = None

    def handle_data(self, data):
        self.text.append(data)
        if self._card is not None and data.strip():
            self._card.append(data.strip())


def job(tmp_path: Path, out: str = "out") -> dict:
    model = tmp_path / "model.yaml"
    model.write_text(MODEL_YAML)
    return run(["--input", str(tmp_path / "in" / "*"), "--output", str(tmp_path / out), "--model", str(model),
                "--max_tokens", "2", "--batch_tokens", "64"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small job with completions, errors of three types and a duplicate id: (its directory, manifest)."""
    tmp_path = tmp_path_factory.mktemp("report")
    (tmp_path / "in").mkdir()
    good = [json.dumps({"id": f"a{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
    bad = ["{not json", json.dumps({"id": "cold", "prompt": "x", "temperature": -1}),
           json.dumps({"id": "no-prompt", "text": "hi"}), json.dumps({"id": "a0", "prompt": "A kludge is"})]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(good + bad) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(json.dumps({"id": f"b{i}", "prompt": p * (i + 1)})
                                                       for i, p in enumerate(PROMPTS)) + "\n")
    return tmp_path, job(tmp_path)


def test_report_is_self_contained_and_shows_the_manifest(finished):
    tmp_path, summary = finished
    path = tmp_path / "out" / report.REPORT
    text = path.read_text()
    page = Page(text)
    manifest = json.loads((tmp_path / "out" / io.MANIFEST).read_text())
    assert manifest["errors"] == 3 and manifest["completions"] == 11 and manifest["duplicate_ids"]["ids"] == 1

    # nothing is fetched at view time: no scripts, no stylesheets or images by reference, no remote URL
    tags = {t for t, _ in page.tags}
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    refs = [a[k] for _, a in page.tags for k in ("src", "href", "xlink:href") if a.get(k)]
    assert not refs, refs
    assert not re.search(r"https?://|url\(", text)

    assert {a.get("id") for t, a in page.tags if t == "h2"} >= set(SECTIONS)
    assert len(page.bars_per_svg) == 6 and all(page.bars_per_svg), page.bars_per_svg  # wall time split, time
    # inside the pipelines, tokens/s, records/s, two length histograms: each with bars
    assert_svgs_are_images(text)

    cards = page.cards
    for key, label in (("records", "records"), ("completions", "completions"), ("errors", "errors"),
                       ("prompt_tokens", "prompt tokens"), ("completion_tokens", "completion tokens"),
                       ("input_shards", "input shards")):
        assert cards[label] == f"{manifest[key]:,}", (label, cards)
    assert cards["shards done"] == str(len(manifest["shards_done"])) == "2" and cards["shards skipped"] == "0"
    assert cards["duplicate ids"] == "1"

    words = " ".join(page.text)
    for kind in manifest["errors_by_type"]:
        assert kind in words
    assert "cold" in words and "temperature" in words  # an example id and its message
    assert "demo" in page.text[page.text.index("checkpoint") + 1]  # the model, in the config table


def test_report_cli_rebuilds_the_same_page_and_metrics(finished):
    tmp_path, _ = finished
    out = tmp_path / "out"
    page, prom = (out / report.REPORT).read_text(), (out / prometheus.METRICS).read_text()
    (out / report.REPORT).unlink()
    (out / prometheus.METRICS).unlink()
    done = subprocess.run([sys.executable, "-m", "pipeline.report", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / report.REPORT).read_text() == page
    assert (out / prometheus.METRICS).read_text() == prom
    assert {a.get("id") for t, a in Page(page).tags if t == "h2"} >= set(SECTIONS)


def test_report_cli_without_a_manifest_is_one_line_naming_the_path(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no run manifest ({tmp_path}/{io.MANIFEST})" in err, err
    assert not (tmp_path / report.REPORT).exists()


def test_timings_are_in_the_manifest_and_the_report(finished):
    tmp_path, _ = finished
    m = json.loads((tmp_path / "out" / io.MANIFEST).read_text())
    t, dists = m["timings"], m["metrics"]["distributions"]
    assert t["passes"] == 1 and set(t["phases_s"]) == {"setup", "pipelines", "summary"}
    assert t["phases_s"]["pipelines"] > 0 and sum(t["phases_s"].values()) >= m["wall_s"] - 0.01
    assert t["batches"] == dists["batch_latency_ms"]["count"] == dists["batch_engine_wait_us"]["count"] > 0
    assert set(t["steps_s"]) == {"tokenize", "engine_wait", "handler_host", "detokenize", "write"}
    assert t["steps_s"]["engine_wait"] == round(dists["batch_engine_wait_us"]["sum"] / 1e6, 3) > 0
    assert dists["write_shard_us"]["count"] == len(m["shards_done"])
    assert t["engine"]["engines"] == 1
    words = " ".join(Page((tmp_path / "out" / report.REPORT).read_text()).text)
    assert "batches waiting on the engine" in words and "write the output shards" in words


def test_engine_stats_reach_the_manifest_metrics_and_report(tmp_path, monkeypatch):
    """Engine.stats() is cumulative per engine; the handler threads sharing one engine add up its
    increments, so the run's totals equal what the engine reports."""
    stats = {"prefill_s": 1.25, "decode_s": 3.5, "compile_s": 0.75, "compiled_functions": 4, "prefill_calls": 6,
             "decode_calls": 30}
    monkeypatch.setattr(Engine, "stats", lambda self: dict(stats), raising=False)
    monkeypatch.setattr(handler, "_counted", {})  # count the shared engine from zero in this test
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    m = job(tmp_path)
    assert m["timings"]["engine"] == {"engines": 1, **stats}
    counters = m["metrics"]["counters"]
    assert (counters["engine_prefill_ms"], counters["engine_decode_calls"]) == (1250, 30)
    words = " ".join(Page((tmp_path / "out" / report.REPORT).read_text()).text)
    assert "prefill" in words and "decode" in words and "compile" in words and "3.50 s" in words
    assert "Not measured in this run: model load." in words  # the engine was loaded by an earlier job
    parsed = prom_values((tmp_path / "out" / prometheus.METRICS).read_text())
    assert parsed[("llm_batch_engine_seconds", (("part", "decode"),))] == 3.5
    assert parsed[("llm_batch_engine_calls", (("step", "prefill"),))] == 6
    again = job(tmp_path, out="again")  # the same engine, whose stats have not moved since
    assert again["timings"]["engine"] == {"engines": 1, **{k: 0 for k in stats}}


def test_engine_numbers_without_stats_or_with_failing_stats():
    class Failing:
        def stats(self):
            raise RuntimeError("no stats today")

    class Odd:
        def stats(self):
            return {"prefill_s": "soon", "decode_calls": 3}

    assert handler.engine_numbers(object(), None) == {}
    assert handler.engine_numbers(Failing(), 2.5) == {"engine_load_ms": 2500}
    assert handler.engine_numbers(Odd(), None) == {}


def test_metrics_prom_parses_and_equals_the_manifest(finished):
    tmp_path, _ = finished
    m = json.loads((tmp_path / "out" / io.MANIFEST).read_text())
    got = prom_values((tmp_path / "out" / prometheus.METRICS).read_text())
    for key in ("records", "completions", "errors", "prompt_tokens", "completion_tokens"):
        assert got[(f"llm_batch_{key}", ())] == m[key]
    assert {k[1][0][1]: v for k, v in got.items() if k[0] == "llm_batch_errors_by_type"} == m["errors_by_type"]
    assert got[("llm_batch_wall_seconds", ())] == m["wall_s"]
    assert got[("llm_batch_completion_tokens_per_second", ())] == m["completion_tokens_per_s"]
    assert got[("llm_batch_shards", (("state", "done"),))] == len(m["shards_done"])
    t = m["timings"]
    for step, seconds in t["steps_s"].items():
        assert got[("llm_batch_step_seconds", (("step", step),))] == seconds
    for phase, seconds in t["phases_s"].items():
        assert got[("llm_batch_phase_seconds", (("phase", phase),))] == seconds
    assert got[("llm_batch_batches", ())] == t["batches"] and got[("llm_batch_engines", ())] == t["engine"]["engines"]
    info = next(dict(k[1]) for k in got if k[0] == "llm_batch_run_info")
    assert info["output"] == m["output"] and info["config_hash"] == m["config_hash"]


def test_metrics_prom_escapes_label_values_and_help():
    odd = 'gs://b/a "quoted" \\ back\nslash'
    manifest = {"output": odd, "records": 3, "errors_by_type": {'we"ird\\': 1}, "wall_s": 1.5}
    text = prometheus.exposition(manifest)
    got = prom_values(text)
    assert next(dict(k[1]) for k in got if k[0] == "llm_batch_run_info")["output"] == odd
    assert got[("llm_batch_errors_by_type", (("type", 'we"ird\\'),))] == 1
    assert got[("llm_batch_records", ())] == 3 and ("llm_batch_completions", ()) not in got  # absent: left out
    assert all(line.startswith(("# HELP llm_batch_", "# TYPE llm_batch_", "llm_batch_")) for line in text.splitlines())


def test_a_rerun_that_skips_every_shard_reports_the_whole_output(finished):
    tmp_path, first = finished
    again = job(tmp_path)
    page = Page((tmp_path / "out" / report.REPORT).read_text())
    assert page.cards["records"] == f"{first['records']:,}" and page.cards["shards skipped"] == "2"
    assert "wrote no shards" in " ".join(page.text)
    assert again["records"] == first["records"]


def test_a_report_that_fails_does_not_fail_the_job(finished, monkeypatch, caplog):
    tmp_path, first = finished

    def broken(*args, **kwargs):
        raise ValueError("no report today")

    monkeypatch.setattr(report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        again = job(tmp_path)
    assert again["records"] == first["records"]
    assert any("could not write the run report: ValueError: no report today" in r.getMessage()
               for r in caplog.records)


def test_a_long_run_keeps_the_page_small():
    """A day-long run with 200k records of every length up to 8k tokens: the charts stay at a few
    dozen bars, so the page stays small whatever the size of the run."""
    manifest = {"records": 200_000, "completions": 200_000, "errors": 0, "config": {"model": {"checkpoint": "big"}},
                "metrics": {"distributions": {"batch_latency_ms": {"count": 9, "sum": 90, "min": 1, "max": 20}}},
                "timings": {"passes": 1, "phases_s": {"setup": 1.0, "pipelines": 86_000.0, "summary": 30.0}}}
    lengths = {n: 25 for n in range(8192)}
    data = {"prompt_lengths": lengths, "completion_lengths": lengths, "error_examples": {},
            "timeline": [(t, 2, 100) for t in range(0, 86_400, 3)]}
    text = report.render(manifest, data)
    page = Page(text)
    assert len(text.encode()) < 200_000
    assert max(page.bars_per_svg) <= report.MAX_BARS
    assert "tokens/s, per 1440 s" in " ".join(page.text)


def test_a_run_without_records_or_local_counts_says_what_is_missing():
    manifest = {"records": 0, "completions": 0, "errors": 0, "config": {"model": {"checkpoint": "demo"}},
                "timings": {"passes": 1, "phases_s": {"setup": 0.1, "pipelines": 2.0, "summary": 0.1}}}
    data = {"prompt_lengths": {}, "completion_lengths": {}, "error_examples": {}, "timeline": None}
    words = " ".join(Page(report.render(manifest, data)).text)
    assert "Not available for this run: records were counted in worker processes" in words
    assert "No completions: no prompt tokens histogram" in words and "No errors." in words
    assert "Not measured in this run: model load, compile, prefill, decode, tokenize" in words
    assert f"the output directory has no {report.DATA}" in " ".join(Page(report.render(manifest, None)).text)


def assert_svgs_are_images(text: str) -> None:
    """Every inline SVG parses as XML on its own, and its shapes have finite, non-negative sizes."""
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    assert svgs
    for svg in svgs:
        root = ET.fromstring(svg)
        for el in root.iter():
            for attr in ("x", "y", "width", "height"):
                if attr in el.attrib:
                    value = float(el.attrib[attr])
                    assert math.isfinite(value) and (attr in ("x", "y") or value >= 0), (el.tag, el.attrib)


def prom_values(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, read with prometheus_client's own parser; every
    family must be a gauge with HELP text."""
    parser = pytest.importorskip("prometheus_client.parser")
    out = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.type == "gauge" and family.documentation, family
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
