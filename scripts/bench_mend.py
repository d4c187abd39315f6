"""Edit latency of MEND vs FT (and ROME when available) on the default model: prints median seconds per edit.

    python scripts/bench_mend.py --n 10 --threads 1

MEND's edit is one forward/backward and a few small products, so it is very sensitive to thread
oversubscription: with torch's default (one thread per core) on cores other processes also use, each small
op waits for a descheduled thread. Pin --threads and compare runs at a similar load (printed).
"""
import argparse
import importlib.util
import os
import statistics

import torch

import kedit_lite as ke


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--method", action="append", help="only these methods (default: mend, ft, rome)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = ke.load_model()
    cases = ke.load_counterfact("val", n=args.n)
    methods = args.method or ["mend", "ft"] + (["rome"] if importlib.util.find_spec("kedit_lite.rome") else [])
    ke.edit(model, tok, cases[0].request, method="mend").undo()  # load the checkpoint once (cached afterwards)
    print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} load average={os.getloadavg()[0]:.1f}")
    for method in methods:
        seconds = []
        for case in cases:
            result = ke.edit(model, tok, case.request, method=method)
            seconds.append(result.seconds)
            result.undo()
        print(f"{method:5s} median {statistics.median(seconds):.3f} s/edit  (n={len(seconds)}, "
              f"min {min(seconds):.3f}, max {max(seconds):.3f}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
