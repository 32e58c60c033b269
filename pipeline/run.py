"""python -m pipeline.run --input GLOB --output DIR [--model demo|PATH|configs/models/X.yaml] [Beam options]

A fatal error prints one line, `error: <what> (<where>): <what to do>`, and exits with 2 when the job
refused to start (pipeline.errors.JobError) or 1 when it failed while running; --verbose adds the
traceback.
"""

from __future__ import annotations

import contextlib
import io as io_
import logging
import sys
import traceback

from pipeline import io
from pipeline.errors import error_line
from pipeline.job import run


def print_summary(summary: dict, input_glob: str, argv: list[str]) -> None:
    prompts = _prompts_for({s["id"] for s in summary["samples"]}, input_glob, argv)
    rows = [("records", summary.get("records", 0)), ("completions", summary.get("completions", 0)),
            ("errors", f"{summary['errors']} {summary['errors_by_type'] or ''}".strip()),
            ("shards", _shards_line(summary)), ("prompt tokens", summary.get("prompt_tokens", 0)),
            ("completion tokens", summary.get("completion_tokens", 0)),
            ("completion tokens/s", summary["completion_tokens_per_s"]), ("wall time (s)", summary["wall_s"])]
    dups = summary.get("duplicate_ids") or {}
    if dups.get("ids"):
        rows.append(("duplicate ids", f"{dups['ids']} (e.g. {', '.join(repr(e['id']) for e in dups['examples'])})"))
    if summary.get("limit"):
        rows.append(("limit", f"first {summary['limit']['records']} records"))
    if summary.get("output"):
        rows.append(("manifest", summary["output"].rstrip("/") + "/" + io.MANIFEST))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for s in summary["samples"]:
        print(f"\n[{s['id']}] {prompts.get(s['id'], '')!s}\n  -> {s['completion']!r}")


def _shards_line(summary: dict) -> str:
    if "shards_done" not in summary:
        return str(summary["shards"])
    return f"{summary['shards']} ({len(summary['shards_done'])} written, {len(summary['shards_skipped'])} " \
           "already complete)"


def _prompts_for(ids: set[str], input_glob: str, argv: list[str]) -> dict[str, str]:
    """Looks the sample ids up in the input, to show each completion beside its prompt (or its
    last chat message), reading each shard as the job read it."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import formats
    from pipeline.options import JobOptions
    from pipeline.records import parse

    if not ids:
        return {}
    opts = PipelineOptions(argv).view_as(JobOptions)
    columns = formats.Columns(opts.prompt_column, opts.id_column, opts.prompt_feature, opts.id_feature)
    defaults = {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    found = {}
    for url in io.discover_shards(input_glob):
        name, fmt = url.rsplit("/", 1)[-1], formats.shard_format(url, opts.format)
        for line, raw in formats.read_records(url, fmt, columns, opts.max_record_bytes):
            rec = parse(raw, 0, name, line, fmt, defaults)
            if rec.id in ids:
                messages = getattr(rec, "messages", None)
                found[rec.id] = messages[-1]["content"] if messages else getattr(rec, "prompt", "")
            if len(found) == len(ids):
                return found
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)  # progress lines, passes, skipped shards
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv  # read here: the options themselves may be what fails
    # Beam logs the traceback of a failing step before it raises the failure; main reports it once
    # (in the step itself, and in the worker thread that ran it)
    for name in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    try:
        # Beam's worker threads print a failing step's traceback straight to sys.stderr; the
        # failure is reported below as one line (logging keeps its own handle on the real stderr)
        with contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io_.StringIO()):
            summary = run(argv)
        glob = argv[argv.index("--input") + 1] if "--input" in argv else next(
            a.split("=", 1)[1] for a in argv if a.startswith("--input="))
        print_summary(summary, glob, argv)
    except Exception as e:  # noqa: BLE001 (every failure becomes one line and an exit code)
        if verbose:
            traceback.print_exc()
        line, code = error_line(e)
        print(line, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
