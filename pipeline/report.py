"""The run report, `OUT/_report.html`: one self-contained page (inline CSS and SVG, no scripts, nothing
fetched at view time) that shows a finished run at a glance: its counts, where the time went,
throughput over the run, prompt and completion lengths, errors by type with examples, and the model
and configuration.

Every number on the page comes from the run manifest or from `OUT/_report_data.json`, which `job.run`
writes beside it (see write_report); what the job does not measure is named as such, never
estimated. `python -m pipeline.report OUT` builds the page again from those two files, and writes
`OUT/_metrics.prom` again too.
"""

from __future__ import annotations

import html
import json
import math
import sys
from typing import Any, Mapping

import fsspec

from pipeline import io, prometheus
from pipeline.errors import JobError, error_line

REPORT = "_report.html"
DATA = "_report_data.json"
MAX_BARS = 60  # a throughput chart has at most this many bars; longer runs use wider time bins
LENGTH_BINS = 24
# the time split inside the pipelines: (part of the manifest's timings, key, label)
INSIDE = (("engine", "load_s", "model load"), ("engine", "compile_s", "compile"),
          ("engine", "prefill_s", "prefill"), ("engine", "decode_s", "decode"),
          ("steps_s", "tokenize", "tokenize"), ("steps_s", "engine_wait", "batches waiting on the engine"),
          ("steps_s", "handler_host", "batches' host time in the handler"),
          ("steps_s", "detokenize", "detokenize"), ("steps_s", "write", "write the output shards"))

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 8px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
.card.bad b{color:#b3261e}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #d8dce3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#5b6475;font-size:12.5px;margin:4px 0 10px;max-width:860px}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:8px}
figcaption{font-size:12.5px;color:#5b6475;margin-bottom:4px}
code{font-size:12.5px;word-break:break-all}
"""
NO_DATA = f"<p class=note>Not available: the output directory has no {DATA}.</p>"
COLORS = ("#3b6fd8", "#e08a2c", "#3aa57a", "#9a5bc8", "#c8504a")


def write_report(url: str, manifest: Mapping[str, Any], data: Mapping[str, Any] | None) -> None:
    """Writes the run report to `url` (local path or gs://) atomically, with io.write_atomic.

    manifest: the run's manifest (`_manifest.json`) as a dict. data (`_report_data.json`; None
    where there is none): what the manifest does not hold, gathered by `job.run` in passes it
    makes anyway:
      prompt_lengths, completion_lengths: {tokens: completions} over every shard of the run;
      error_examples: {error type: [{"id", "message"}], up to 3 each};
      timeline: [(second since start, records finished, completion tokens)] as counted in the
        launching process, or None where the records were counted elsewhere.
    """
    io.write_atomic(url, [render(manifest, data)])


def rebuild(output_dir: str) -> None:
    """Writes OUT/_report.html and OUT/_metrics.prom again from OUT/_manifest.json and, where it
    is there, OUT/_report_data.json. A JobError when OUT has no manifest."""
    out = output_dir.rstrip("/")
    manifest = _read_json(out + "/" + io.MANIFEST)
    if manifest is None:
        raise JobError("no run manifest", out + "/" + io.MANIFEST, "pass the --output directory of a finished job")
    write_report(out + "/" + REPORT, manifest, _read_json(out + "/" + DATA))
    prometheus.write_metrics(out + "/" + prometheus.METRICS, manifest)


def main(argv: list[str] | None = None) -> int:
    """python -m pipeline.report OUT: see rebuild. A failure is one line on stderr (pipeline.errors)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m pipeline.report OUT  (a job's --output directory: local or gs://)", file=sys.stderr)
        return 2
    try:
        rebuild(argv[0])
    except Exception as e:  # noqa: BLE001 (every failure becomes one line and an exit code)
        line, code = error_line(e)
        print(line, file=sys.stderr)
        return code
    out = argv[0].rstrip("/")
    print(f"wrote {out}/{REPORT} and {out}/{prometheus.METRICS}")
    return 0


def render(manifest: Mapping[str, Any], data: Mapping[str, Any] | None) -> str:
    """The page, as text; see write_report."""
    model = (manifest.get("config") or {}).get("model") or {}
    title = f"Run report: {model.get('checkpoint', '?')}"
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=sub>{_e(manifest.get('input'))} &rarr; {_e(manifest.get('output'))}<br>"
            f"started {_e(manifest.get('started'))}, finished {_e(manifest.get('finished'))}, "
            f"wall time {_s(manifest.get('wall_s'))}</p>",
            _counts(manifest), _time(manifest), _throughput(manifest, data),
            _lengths(data), _errors(manifest, data), _config(manifest)]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><main>\n" + "\n".join(body) + "\n</main></body></html>")


def _counts(m: Mapping[str, Any]) -> str:
    dups = m.get("duplicate_ids") or {}
    cards = [("records", m.get("records")), ("completions", m.get("completions")), ("errors", m.get("errors")),
             ("prompt tokens", m.get("prompt_tokens")), ("completion tokens", m.get("completion_tokens")),
             ("completion tokens/s (this run)", m.get("completion_tokens_per_s")),
             ("shards done", len(m.get("shards_done") or [])), ("shards skipped", len(m.get("shards_skipped") or [])),
             ("input shards", m.get("input_shards")), ("duplicate ids", dups.get("ids"))]
    out = ["<h2 id=counts>Counts</h2><div class=cards>"]
    for label, value in cards:
        bad = label in ("errors", "duplicate ids") and value
        out.append(f"<div class='card{' bad' if bad else ''}'><b>{_n(value)}</b><span>{_e(label)}</span></div>")
    out.append("</div>")
    out.append("<p class=note>From the manifest. The counts cover every shard of the run, written now or skipped as "
               "already complete; tokens are counted over completions. Shards skipped: "
               f"{_e(', '.join(m.get('shards_skipped') or []) or 'none')}.</p>")
    if dups.get("ids"):
        examples = ", ".join(f"{_e(d['id'])} ({d['records']} records)" for d in dups.get("examples", []))
        out.append(f"<p class=note>{_n(dups['ids'])} ids occur more than once, adding {_n(dups.get('extra_records'))} "
                   f"extra records; for example {examples}.</p>")
    return "\n".join(out)


def _time(m: Mapping[str, Any]) -> str:
    t = m.get("timings") or {}
    labels = {"setup": "setup: find shards, fingerprint inputs, plan",
              "pipelines": f"pipelines ({t.get('passes', '?')} pass(es)): load, compile, read, generate, write",
              "summary": "read the outputs back to count them"}
    phases = [(labels.get(k, k), v) for k, v in (t.get("phases_s") or {}).items() if v is not None]
    out = ["<h2 id=time>Where the time went</h2>"]
    if phases:
        out.append(_stacked_bar(phases))
    out.append("<p class=note>Wall time of the launching process, measured by the job around each step.</p>")
    if t.get("passes"):
        inside = [(label, (t.get(part) or {}).get(key)) for part, key, label in INSIDE]
        measured = [(label, s) for label, s in inside if s is not None]
        if measured:
            out.append(_bars(measured, "inside the pipelines, seconds"))
        engines = (t.get("engine") or {}).get("engines")
        missing = [label for label, s in inside if s is None]
        out.append("<p class=note>Inside the pipelines, each bar is measured on its own. Model load is timed by "
                   "the job around loading the engine; compile, prefill and decode are the engine's own figures "
                   f"(<code>Engine.stats()</code>); each is summed over the {_n(engines)} engine(s) the workers "
                   "used. The steps are summed over batches, shards and threads, which run at the same time, so "
                   "the bars overlap and can add up to more than the pipelines' wall time. "
                   + (f"Not measured in this run: {_e(', '.join(missing))}." if missing else "") + "</p>")
    metrics = m.get("metrics") or {}
    dists = metrics.get("distributions") or {}
    if dists:
        rows = [[_e(name), _n(v["count"]), _n(round(v["sum"] / max(v["count"], 1), 1)), _n(v["min"]), _n(v["max"]),
                 _n(v["sum"])] for name, v in sorted(dists.items())]
        out.append("<table><tr><th>Beam distribution</th><th>count</th><th>mean</th><th>min</th><th>max</th>"
                   "<th>sum</th></tr>" + "".join(_row(r, first_text=True) for r in rows) + "</table>")
        out.append("<p class=note>From the manifest's Beam metrics, over this run's pipelines (_ms: milliseconds, "
                   "_us: microseconds). batch_latency_ms is a batch's time from submission to the engine until "
                   "its last record is done; batches from several worker threads share the engine at once, so "
                   "their sum can exceed the wall time.</p>")
    counters = metrics.get("counters") or {}
    if counters:
        out.append("<table><tr><th>Beam counter</th><th>value</th></tr>"
                   + "".join(_row([_e(k), _n(v)], first_text=True) for k, v in sorted(counters.items()))
                   + "</table>")
    return "\n".join(out)


def _throughput(m: Mapping[str, Any], d: Mapping[str, Any] | None) -> str:
    out = ["<h2 id=throughput>Throughput over the run</h2>"]
    timings = m.get("timings")  # None: a manifest from before timings were recorded
    if timings is not None and not timings.get("passes"):
        return out[0] + "<p class=note>This run wrote no shards (all were complete already).</p>"
    if d is None:
        return out[0] + NO_DATA
    timeline = d.get("timeline")
    if not timeline:
        return out[0] + ("<p class=note>Not available for this run: records were counted in worker processes "
                         "(a distributed runner, or multi_processing), not in the launching process.</p>")
    first, last = 0, timeline[-1][0]  # from the job's start: the time before the first record shows
    width = max(1, math.ceil((last - first + 1) / MAX_BARS))
    tokens, records = {}, {}
    for t, n, tok in timeline:
        b = first + (t - first) // width * width
        tokens[b], records[b] = tokens.get(b, 0) + tok, records.get(b, 0) + n
    starts = range(first, last + 1, width)
    tok_bars = [(b, b + width, tokens.get(b, 0) / width) for b in starts]
    rec_bars = [(b, b + width, records.get(b, 0)) for b in starts]
    out.append("<div class=charts>"
               + _chart(tok_bars, f"completion tokens/s, per {width} s", "seconds since the job started", COLORS[0])
               + _chart(rec_bars, f"records finished, per {width} s", "seconds since the job started", COLORS[2])
               + "</div>")
    out.append("<p class=note>From the job's progress counter in the launching process: the time each record "
               "finished generation (or failed), before its shard was written; this run's shards only. Time 0 is "
               "the job's start, so the gap before the first bars is setup, model load and compilation. Outputs "
               "become visible later, when each shard is written whole.</p>")
    return "\n".join(out)


def _lengths(d: Mapping[str, Any] | None) -> str:
    out = ["<h2 id=lengths>Prompt and completion lengths</h2><div class=charts>"]
    if d is None:
        return out[0] + "</div>" + NO_DATA
    for key, label, color in (("prompt_lengths", "prompt tokens", COLORS[0]),
                              ("completion_lengths", "completion tokens", COLORS[1])):
        counts = {int(k): v for k, v in (d.get(key) or {}).items()}
        if counts:
            out.append(_chart(_histogram(counts), f"completions by {label} (n = {sum(counts.values()):,}, "
                              f"mean {_mean(counts):,.1f}, max {max(counts):,})", label, color))
        else:
            out.append(f"<p class=note>No completions: no {_e(label)} histogram.</p>")
    out.append("</div><p class=note>Read from every output shard of the run (completions only).</p>")
    return "\n".join(out)


def _errors(m: Mapping[str, Any], d: Mapping[str, Any] | None) -> str:
    by_type = m.get("errors_by_type") or {}
    out = ["<h2 id=errors>Errors by type</h2>"]
    if not by_type:
        return out[0] + "<p class=note>No errors.</p>"
    examples = (d or {}).get("error_examples") or {}
    rows = []
    for kind, n in sorted(by_type.items(), key=lambda kv: -kv[1]):
        shown = "<br>".join(f"<code>{_e(_or(x.get('id'), '(no id)'))}</code>: {_e(_short(x.get('message')))}"
                            for x in examples.get(kind, []))
        rows.append(f"<tr><td>{_e(kind)}</td><td class=n>{_n(n)}</td><td>{shown}</td></tr>")
    out.append("<table><tr><th>type</th><th>records</th><th>examples (id: message)</th></tr>" + "".join(rows)
               + "</table><p class=note>Counts from the manifest; examples are the first of each type in the "
               "output shards.</p>" + (NO_DATA if d is None else ""))
    return "\n".join(out)


def _config(m: Mapping[str, Any]) -> str:
    config = m.get("config") or {}
    out = [f"<h2 id=config>Model and configuration</h2><p class=note>config hash "
           f"<code>{_e(m.get('config_hash'))}</code>; command line <code>{_e(' '.join(m.get('argv') or []))}</code></p>"
           "<div class=charts>"]
    for title, values in (("model", config.get("model") or {}), ("job", config.get("job") or {}),
                          ("versions", m.get("versions") or {})):
        out.append(f"<table><tr><th colspan=2>{_e(title)}</th></tr>"
                   + "".join(f"<tr><td>{_e(k)}</td><td>{_e(_value(v))}</td></tr>" for k, v in _flat(values))
                   + "</table>")
    out.append("</div>")
    return "\n".join(out)


def _histogram(counts: Mapping[int, int]) -> list[tuple[float, float, float]]:
    """{value: n} -> [(lo, hi, n)] over equal integer-wide bins from 0 to the largest value."""
    width = max(1, math.ceil((max(counts) + 1) / LENGTH_BINS))
    bins: dict[int, int] = {}
    for value, n in counts.items():
        bins[value // width] = bins.get(value // width, 0) + n
    return [(i * width, (i + 1) * width, bins.get(i, 0)) for i in range(max(bins) + 1)]


def _chart(bars: list[tuple[float, float, float]], caption: str, x_label: str, color: str,
           w: int = 440, h: int = 200) -> str:
    """An SVG bar chart of [(x from, x to, height)], with its caption. Every SVG on the page is
    well-formed XML (quoted attributes, no HTML entities), so each also stands alone as an image."""
    left, right, top, bottom = 52, 10, 8, 34
    pw, ph = w - left - right, h - top - bottom
    x0, x1 = bars[0][0], bars[-1][1]
    top_value = max(b[2] for b in bars) or 1
    ticks = _ticks(top_value)
    y_max = max(ticks[-1], top_value)
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * pw  # noqa: E731
    sy = lambda y: top + ph - y / y_max * ph  # noqa: E731
    parts = [f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' "
             f"aria-label='{_e(caption)}' font-size='11' fill='#1d2330'>"]
    for t in ticks:
        parts.append(f"<line x1='{left}' x2='{w - right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#e3e6eb'/>"
                     f"<text x='{left - 4}' y='{sy(t) + 4:.1f}' text-anchor='end'>{_short_num(t)}</text>")
    for lo, hi, v in bars:
        x, bw = sx(lo), max(sx(hi) - sx(lo) - 1, 1)
        parts.append(f"<rect x='{x:.1f}' y='{sy(v):.1f}' width='{bw:.1f}' height='{sy(0) - sy(v):.1f}' "
                     f"fill='{color}'><title>{_short_num(lo)}\u2013{_short_num(hi)}: {_short_num(v)}</title></rect>")
    for x in _ticks(x1 - x0, 5):
        if x0 + x <= x1:
            parts.append(f"<text x='{sx(x0 + x):.1f}' y='{top + ph + 14}' text-anchor='middle'>"
                         f"{_short_num(x0 + x)}</text>")
    parts.append(f"<line x1='{left}' x2='{w - right}' y1='{sy(0):.1f}' y2='{sy(0):.1f}' stroke='#8a93a3'/>"
                 f"<text x='{left + pw / 2:.1f}' y='{h - 4}' text-anchor='middle' fill='#5b6475'>{_e(x_label)}</text>"
                 "</svg>")
    return f"<figure><figcaption>{_e(caption)}</figcaption>{''.join(parts)}</figure>"


def _stacked_bar(parts: list[tuple[str, float]], w: int = 900) -> str:
    """An SVG bar of the wall time split into parts [(label, seconds)], with a legend."""
    total = sum(s for _, s in parts) or 1e-9
    svg = [f"<svg width='{w}' height='{34 + 18 * len(parts)}' font-size='12' "
           f"role='img' aria-label='wall time by step' fill='#1d2330'>"]
    x = 0.0
    for i, (label, s) in enumerate(parts):
        bw = s / total * w
        color = COLORS[i % len(COLORS)]
        svg.append(f"<rect x='{x:.1f}' y='0' width='{max(bw, 0.5):.1f}' height='24' fill='{color}'>"
                   f"<title>{_e(label)}: {s:.2f} s</title></rect>")
        y = 40 + 18 * i
        svg.append(f"<rect x='0' y='{y - 10}' width='12' height='12' fill='{color}'/>"
                   f"<text x='18' y='{y}'>{_e(label)}: {s:,.2f} s ({s / total:.0%})</text>")
        x += bw
    return "".join(svg) + "</svg>"


def _bars(parts: list[tuple[str, float]], caption: str, w: int = 900) -> str:
    """An SVG of one horizontal bar per part [(label, seconds)], all on one scale, with its caption."""
    label_w, value_w, row = 260, 90, 20
    top = max(s for _, s in parts) or 1e-9
    svg = [f"<svg width='{w}' height='{row * len(parts)}' font-size='12' role='img' aria-label='{_e(caption)}' "
           "fill='#1d2330'>"]
    for i, (label, s) in enumerate(parts):
        y, bw = row * i, max(s / top * (w - label_w - value_w), 0.5)
        svg.append(f"<text x='0' y='{y + 14}'>{_e(label)}</text>"
                   f"<rect x='{label_w}' y='{y + 3}' width='{bw:.1f}' height='14' fill='{COLORS[i % len(COLORS)]}'>"
                   f"<title>{_e(label)}: {s:.3f} s</title></rect>"
                   f"<text x='{label_w + bw + 6:.1f}' y='{y + 14}'>{s:,.2f} s</text>")
    return f"<figure><figcaption>{_e(caption)}</figcaption>{''.join(svg)}</svg></figure>"


def _ticks(top: float, n: int = 4) -> list[float]:
    """Round tick values from 0 up to at least `top`."""
    if top <= 0:
        return [0]
    raw = top / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def _mean(counts: Mapping[int, int]) -> float:
    return sum(k * v for k, v in counts.items()) / max(sum(counts.values()), 1)


def _row(cells: list[str], first_text: bool = False) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" if (first_text and i == 0) else f"<td class=n>{c}</td>"
                            for i, c in enumerate(cells)) + "</tr>"


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested dict's leaves as ("outer.inner", value), in order."""
    out: list[tuple[str, Any]] = []
    for k, v in values.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [(f"{prefix}{k}", v)]
    return out


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _or(value: Any, instead: str) -> Any:
    return instead if value is None else value


def _short(text: Any, limit: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _short_num(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.3g}k"
    return f"{x:,.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.3g}"


def _n(v: Any) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:,}" if isinstance(v, (int, float)) else _e(v)


def _s(v: Any) -> str:
    return "&ndash;" if v is None else f"{v:,.1f} s"


def _read_json(url: str) -> Any:
    """The JSON document at `url` (local or gs://); None where there is none."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


if __name__ == "__main__":
    sys.exit(main())
