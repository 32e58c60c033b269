"""How soon a notebook preview answers: a fresh interpreter imports pipeline.preview and generates
for one prompt, twice; the script reports the medians over --runs fresh processes, with the
persistent compilation cache warm (filled by a first process) and cold (an empty cache directory
for each process). Also says whether TensorFlow was imported.

    python -m launch.bench_preview            # 3 fresh processes each, warm and cold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.preview import generate
t1 = time.perf_counter()
generate(["Once upon a time"], max_tokens=48, progress=False)
t2 = time.perf_counter()
generate(["Once upon a time"], max_tokens=48, progress=False)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    def child(cache_dir: str) -> dict:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
        done = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])

    out = {}
    with tempfile.TemporaryDirectory() as warm:
        child(warm)  # fills the compile cache
        for cache, dirs in (("warm", [warm] * args.runs), ("cold", [tempfile.mkdtemp(dir=warm) for _ in range(args.runs)])):
            runs = [child(d) for d in dirs]
            out[cache] = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("import_s", "first_s", "second_s")}
            out[cache]["tensorflow_imported"] = any(r["tensorflow_imported"] for r in runs)
            r = out[cache]
            print(f"{cache} compile cache: import {r['import_s']} s, first generate {r['first_s']} s, second "
                  f"{r['second_s']} s (medians of {args.runs} fresh processes); TensorFlow imported: "
                  f"{r['tensorflow_imported']}")
    return out


if __name__ == "__main__":
    main()
