"""How soon a notebook preview answers: a fresh interpreter imports pipeline.preview and generates
for one prompt, twice; the script reports the medians over --runs fresh processes (the persistent
compilation cache is warm after the first). Also says whether TensorFlow was imported.

    python -m launch.bench_preview            # 3 fresh processes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

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
    subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True)  # warms the compile cache
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]) for _ in range(args.runs)]
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("import_s", "first_s", "second_s")}
    out["tensorflow_imported"] = any(r["tensorflow_imported"] for r in runs)
    print(f"import {out['import_s']} s, first generate {out['first_s']} s, second {out['second_s']} s "
          f"(medians of {args.runs} fresh processes); TensorFlow imported: {out['tensorflow_imported']}")
    return out


if __name__ == "__main__":
    main()
