"""Edit latency of MEND vs FT (and ROME when available) on the default model: prints median seconds per edit.

    python scripts/bench_mend.py --n 10
"""
import argparse
import importlib.util
import statistics

import kedit_lite as ke


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    model, tok = ke.load_model()
    cases = ke.load_counterfact("val", n=args.n)
    methods = ["mend", "ft"] + (["rome"] if importlib.util.find_spec("kedit_lite.rome") else [])
    ke.edit(model, tok, cases[0].request, method="mend").undo()  # load the checkpoint once (cached afterwards)
    for method in methods:
        seconds = []
        for case in cases:
            result = ke.edit(model, tok, case.request, method=method)
            seconds.append(result.seconds)
            result.undo()
        print(f"{method:5s} median {statistics.median(seconds):.3f} s/edit  (n={len(seconds)}, "
              f"min {min(seconds):.3f}, max {max(seconds):.3f})")


if __name__ == "__main__":
    main()
