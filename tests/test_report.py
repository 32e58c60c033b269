"""The run report, OUT/_report.html: written by every job beside the manifest, self-contained, and
showing the manifest's numbers; a report that cannot be built never fails the job."""

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline import io, report
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
    assert len(page.bars_per_svg) == 5 and all(page.bars_per_svg), page.bars_per_svg  # time split, tokens/s,
    # records/s, two length histograms: each with bars

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
                "metrics": {"distributions": {"batch_latency_ms": {"count": 9, "sum": 90, "min": 1, "max": 20}}}}
    lengths = {n: 25 for n in range(8192)}
    details = {"prompt_lengths": lengths, "completion_lengths": lengths, "error_examples": {},
               "phases_s": {"setup": 1.0, "pipelines": 86_000.0, "summary": 30.0}, "passes": 1,
               "timeline": [(t, 2, 100) for t in range(0, 86_400, 3)]}
    text = report.render(manifest, details)
    page = Page(text)
    assert len(text.encode()) < 200_000
    assert max(page.bars_per_svg) <= report.MAX_BARS
    assert "tokens/s, per 1440 s" in " ".join(page.text)


def test_a_run_without_records_or_local_counts_says_what_is_missing():
    manifest = {"records": 0, "completions": 0, "errors": 0, "config": {"model": {"checkpoint": "demo"}}}
    details = {"prompt_lengths": {}, "completion_lengths": {}, "error_examples": {},
               "phases_s": {"setup": 0.1, "pipelines": 2.0, "summary": 0.1}, "passes": 1, "timeline": None}
    words = " ".join(Page(report.render(manifest, details)).text)
    assert "Not available for this run: records were counted in worker processes" in words
    assert "No completions: no prompt tokens histogram" in words and "No errors." in words
