"""The run report, `OUT/_report.html`: one self-contained page (inline CSS and SVG, no scripts, nothing
fetched at view time) that shows a finished run at a glance: its counts, where the time went,
throughput over the run, prompt and completion lengths, errors by type with examples, and the model
and configuration.

Every number on the page comes from the run manifest or from what `job.run` gathered while writing
it (see write_report); what the job does not measure is named as such, never estimated.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Mapping

from pipeline import io

REPORT = "_report.html"
MAX_BARS = 60  # a throughput chart has at most this many bars; longer runs use wider time bins
LENGTH_BINS = 24
NOT_MEASURED = ("model load and compilation (the worker logs the load time, 'loaded ... in N s'; it is not "
                "in the manifest)", "prefill and decode, separately", "writing the output shards")

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
COLORS = ("#3b6fd8", "#e08a2c", "#3aa57a", "#9a5bc8", "#c8504a")


def write_report(url: str, manifest: Mapping[str, Any], details: Mapping[str, Any]) -> None:
    """Writes the run report to `url` (local path or gs://) atomically, with io.write_atomic.

    manifest: the run's manifest (`_manifest.json`) as a dict. details: what the manifest does not
    hold, gathered by `job.run` in passes it makes anyway:
      prompt_lengths, completion_lengths: {tokens: completions} over every shard of the run;
      error_examples: {error type: [{"id", "message"}], up to 3 each};
      phases_s: {"setup", "pipelines", "summary"}: seconds of the launching process's wall time;
      passes: the pipelines run;
      timeline: [(second since start, records finished, completion tokens)] as counted in the
        launching process, or None where the records were counted elsewhere.
    """
    io.write_atomic(url, [render(manifest, details)])


def render(manifest: Mapping[str, Any], details: Mapping[str, Any]) -> str:
    model = (manifest.get("config") or {}).get("model") or {}
    title = f"Run report: {model.get('checkpoint', '?')}"
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=sub>{_e(manifest.get('input'))} &rarr; {_e(manifest.get('output'))}<br>"
            f"started {_e(manifest.get('started'))}, finished {_e(manifest.get('finished'))}, "
            f"wall time {_s(manifest.get('wall_s'))}</p>",
            _counts(manifest), _time(manifest, details), _throughput(details),
            _lengths(details), _errors(manifest, details), _config(manifest)]
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


def _time(m: Mapping[str, Any], d: Mapping[str, Any]) -> str:
    phases = d.get("phases_s") or {}
    labels = {"setup": "setup: find shards, fingerprint inputs, plan",
              "pipelines": f"pipelines ({d.get('passes', '?')} pass(es)): load, compile, read, generate, write",
              "summary": "read outputs back, write manifest"}
    parts = [(labels.get(k, k), v) for k, v in phases.items() if v is not None]
    out = ["<h2 id=time>Where the time went</h2>"]
    if parts:
        out.append(_stacked_bar(parts))
    out.append("<p class=note>Wall time of the launching process, measured by the job around each step. Not measured "
               "separately: " + "; ".join(_e(x) for x in NOT_MEASURED) + ". They are all inside the pipelines' "
               "time.</p>")
    metrics = m.get("metrics") or {}
    dists = metrics.get("distributions") or {}
    if dists:
        rows = [[_e(name), _n(v["count"]), _n(round(v["sum"] / max(v["count"], 1), 1)), _n(v["min"]), _n(v["max"]),
                 _n(v["sum"])] for name, v in sorted(dists.items())]
        out.append("<table><tr><th>Beam distribution</th><th>count</th><th>mean</th><th>min</th><th>max</th>"
                   "<th>sum</th></tr>" + "".join(_row(r, first_text=True) for r in rows) + "</table>")
        out.append("<p class=note>From the manifest's Beam metrics, over this run's pipelines. batch_latency_ms is "
                   "a batch's time from submission to the engine until its last record is done; batches from "
                   "several worker threads share the engine at once, so their sum can exceed the wall time.</p>")
    counters = metrics.get("counters") or {}
    if counters:
        out.append("<table><tr><th>Beam counter</th><th>value</th></tr>"
                   + "".join(_row([_e(k), _n(v)], first_text=True) for k, v in sorted(counters.items()))
                   + "</table>")
    return "\n".join(out)


def _throughput(d: Mapping[str, Any]) -> str:
    out = ["<h2 id=throughput>Throughput over the run</h2>"]
    timeline = d.get("timeline")
    if not d.get("passes"):
        return out[0] + "<p class=note>This run wrote no shards (all were complete already).</p>"
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


def _lengths(d: Mapping[str, Any]) -> str:
    out = ["<h2 id=lengths>Prompt and completion lengths</h2><div class=charts>"]
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


def _errors(m: Mapping[str, Any], d: Mapping[str, Any]) -> str:
    by_type = m.get("errors_by_type") or {}
    out = ["<h2 id=errors>Errors by type</h2>"]
    if not by_type:
        return out[0] + "<p class=note>No errors.</p>"
    examples = d.get("error_examples") or {}
    rows = []
    for kind, n in sorted(by_type.items(), key=lambda kv: -kv[1]):
        shown = "<br>".join(f"<code>{_e(_or(x.get('id'), '(no id)'))}</code>: {_e(_short(x.get('message')))}"
                            for x in examples.get(kind, []))
        rows.append(f"<tr><td>{_e(kind)}</td><td class=n>{_n(n)}</td><td>{shown}</td></tr>")
    out.append("<table><tr><th>type</th><th>records</th><th>examples (id: message)</th></tr>" + "".join(rows)
               + "</table><p class=note>Counts from the manifest; examples are the first of each type in the "
               "output shards.</p>")
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
    """An SVG bar chart of [(x from, x to, height)], with its caption."""
    left, right, top, bottom = 52, 10, 8, 34
    pw, ph = w - left - right, h - top - bottom
    x0, x1 = bars[0][0], bars[-1][1]
    top_value = max(b[2] for b in bars) or 1
    ticks = _ticks(top_value)
    y_max = max(ticks[-1], top_value)
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * pw  # noqa: E731
    sy = lambda y: top + ph - y / y_max * ph  # noqa: E731
    parts = [f"<svg width={w} height={h} viewBox='0 0 {w} {h}' role=img "
             f"aria-label='{_e(caption)}' font-size=11 fill='#1d2330'>"]
    for t in ticks:
        parts.append(f"<line x1={left} x2={w - right} y1={sy(t):.1f} y2={sy(t):.1f} stroke='#e3e6eb'/>"
                     f"<text x={left - 4} y={sy(t) + 4:.1f} text-anchor=end>{_short_num(t)}</text>")
    for lo, hi, v in bars:
        x, bw = sx(lo), max(sx(hi) - sx(lo) - 1, 1)
        parts.append(f"<rect x={x:.1f} y={sy(v):.1f} width={bw:.1f} height={sy(0) - sy(v):.1f} fill='{color}'>"
                     f"<title>{_short_num(lo)}&ndash;{_short_num(hi)}: {_short_num(v)}</title></rect>")
    for x in _ticks(x1 - x0, 5):
        if x0 + x <= x1:
            parts.append(f"<text x={sx(x0 + x):.1f} y={top + ph + 14} text-anchor=middle>{_short_num(x0 + x)}</text>")
    parts.append(f"<line x1={left} x2={w - right} y1={sy(0):.1f} y2={sy(0):.1f} stroke='#8a93a3'/>"
                 f"<text x={left + pw / 2:.1f} y={h - 4} text-anchor=middle fill='#5b6475'>{_e(x_label)}</text></svg>")
    return f"<figure><figcaption>{_e(caption)}</figcaption>{''.join(parts)}</figure>"


def _stacked_bar(parts: list[tuple[str, float]], w: int = 900) -> str:
    """An SVG bar of the wall time split into parts [(label, seconds)], with a legend."""
    total = sum(s for _, s in parts) or 1e-9
    svg = [f"<svg width={w} height={34 + 18 * len(parts)} font-size=12 "
           f"role=img aria-label='wall time by step' fill='#1d2330'>"]
    x = 0.0
    for i, (label, s) in enumerate(parts):
        bw = s / total * w
        color = COLORS[i % len(COLORS)]
        svg.append(f"<rect x={x:.1f} y=0 width={max(bw, 0.5):.1f} height=24 fill='{color}'>"
                   f"<title>{_e(label)}: {s:.2f} s</title></rect>")
        y = 40 + 18 * i
        svg.append(f"<rect x=0 y={y - 10} width=12 height=12 fill='{color}'/>"
                   f"<text x=18 y={y}>{_e(label)}: {s:,.2f} s ({s / total:.0%})</text>")
        x += bw
    return "".join(svg) + "</svg>"


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


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)
