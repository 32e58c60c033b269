"""python -m pipeline.run --input GLOB --output DIR [--model demo|PATH|configs/models/X.yaml] [Beam options]"""

from __future__ import annotations

import json
import logging
import sys

from pipeline import io
from pipeline.job import run


def print_summary(summary: dict, input_glob: str) -> None:
    prompts = _prompts_for({s["id"] for s in summary["samples"]}, input_glob)
    rows = [("records", summary.get("records", 0)), ("completions", summary.get("completions", 0)),
            ("errors", f"{summary['errors']} {summary['errors_by_type'] or ''}".strip()),
            ("shards", summary["shards"]), ("prompt tokens", summary.get("prompt_tokens", 0)),
            ("completion tokens", summary.get("completion_tokens", 0)),
            ("completion tokens/s", summary["completion_tokens_per_s"]), ("wall time (s)", summary["wall_s"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for s in summary["samples"]:
        print(f"\n[{s['id']}] {prompts.get(s['id'], '')!s}\n  -> {s['completion']!r}")


def _prompts_for(ids: set[str], input_glob: str) -> dict[str, str]:
    """Looks the sample ids up in the input, to show each completion beside its prompt."""
    found = {}
    for url in io.discover_shards(input_glob):
        name = url.rsplit("/", 1)[-1]
        for line, raw in io.read_lines(url):
            try:
                text = raw.decode("utf-8")
                rec = json.loads(text) if io.shard_format(url, "auto") == "jsonl" else {"prompt": text}
                rid = str(rec.get("id", f"{name}:{line}"))
            except (ValueError, AttributeError):
                continue
            if rid in ids:
                found[rid] = rec.get("prompt")
            if len(found) == len(ids):
                return found
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    summary = run(argv)
    glob = argv[argv.index("--input") + 1] if "--input" in argv else next(
        a.split("=", 1)[1] for a in argv if a.startswith("--input="))
    print_summary(summary, glob)
    return 0


if __name__ == "__main__":
    sys.exit(main())
