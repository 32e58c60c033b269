"""How long the run report of a large job takes to build, and how big the page is: a synthetic
output shard of --records records (2% errors, random lengths) is read back as the job reads its
outputs for the report (`job.summarize`), then the page is rendered (`report.render`) with the
manifest and timeline of a finished run (default: the demo's, from `make demo`).

    python -m launch.bench_report --records 100000 [--run out/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from pipeline import io, job, report


def write_shard(url: str, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    errors = 0
    with open(url, "w") as f:
        for i in range(records):
            if i % 50 == 0:
                errors += 1
                rec = {"id": f"r{i}", "error": {"type": rng.choice(["invalid_json", "prompt_too_long"]),
                                                "message": "x" * 80}}
            else:
                rec = {"id": f"r{i}", "completion": "word " * rng.randint(1, 60), "prompt_tokens": rng.randint(5, 900),
                       "completion_tokens": rng.randint(1, 256), "finish_reason": "length"}
            f.write(json.dumps(rec) + "\n")
    io.write_marker(url, {"records": records, "completions": records - errors, "errors": errors})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--run", default="out/demo", help="a finished run's output directory (its manifest and timeline)")
    args = p.parse_args(argv)
    with open(os.path.join(args.run, "_manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(args.run, report.DATA)) as f:
        data = json.load(f)
    with tempfile.TemporaryDirectory() as d:
        url = os.path.join(d, "part-0.jsonl")
        write_shard(url, args.records)
        start = time.perf_counter()
        summary = job.summarize([url], wall_s=1.0)
        read_s = time.perf_counter() - start
    details = {**data, **{k: summary[k] for k in ("prompt_lengths", "completion_lengths", "error_examples")}}
    start = time.perf_counter()
    page = report.render(manifest, details)
    render_s = time.perf_counter() - start
    out = {"records": args.records, "read_s": round(read_s, 2), "render_s": round(render_s, 3),
           "page_bytes": len(page.encode())}
    print(f"{args.records} records: read back in {read_s:.2f} s, page rendered in {render_s:.3f} s, "
          f"{out['page_bytes'] / 1e6:.3f} MB")
    return out


if __name__ == "__main__":
    main()
