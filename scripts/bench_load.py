"""Time loading the embedded default model: warm (from the safetensors cache) and, with --cold, the first load.

    python scripts/bench_load.py [--cold] [--repeat 3]
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cold", action="store_true", help="also time a first load into an empty cache directory")
parser.add_argument("--repeat", type=int, default=3)
args = parser.parse_args()

if args.cold:
    cold_cache = tempfile.mkdtemp(prefix="kedit-cold-")
    os.environ["KEDIT_CACHE"] = cold_cache
import kedit_lite as ke  # noqa: E402  (after KEDIT_CACHE is set)

if args.cold:
    start = time.perf_counter()
    ke.load_model()
    print(f"cold load (dequantize GGUF + write safetensors): {time.perf_counter() - start:.2f} s")
warm = []
for _ in range(args.repeat):
    start = time.perf_counter()
    ke.load_model()
    warm.append(time.perf_counter() - start)
print(f"warm load: median {statistics.median(warm):.2f} s over {args.repeat} (min {min(warm):.2f} s)")
if args.cold:
    shutil.rmtree(cold_cache, ignore_errors=True)
