"""Speed of chapter 5's methods: statistics build time and single ROME / MEMIT edit times (wall and CPU).

    python scripts/bench_rome.py [--n-tokens 8000] [--edits 3] [--memit-batch 10] [--rebuild]

CPU time (process_time) is printed beside wall time: on a shared machine the wall time is inflated by
contention, the CPU time is not (divide it by the cores torch uses for an uncontended estimate).
"""
import argparse
import statistics
import time

import torch

import kedit_lite as ke
from kedit_lite import memit, rome, stats


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=stats.DEFAULT_N_TOKENS)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--memit-batch", type=int, default=10)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the statistics instead of using the cache")
    args = parser.parse_args()
    model, tok = ke.load_model()
    layer = rome.default_layer(model)
    print(f"threads={torch.get_num_threads()} layer={layer} n_tokens={args.n_tokens}")
    _, wall, cpu = timed(lambda: stats.second_moments(model, tok, memit.default_layers(model), n_tokens=args.n_tokens,
                                                      use_cache=not args.rebuild, progress=False))
    print(f"statistics ({len(memit.default_layers(model))} layers): wall {wall:.1f} s, cpu {cpu:.1f} s")
    ke.keys_values.context_prefixes(model, tok)   # generated once per model, as in any session
    cases = ke.load_counterfact("val", n=args.edits)
    walls, cpus = [], []
    for case in cases:
        result, wall, cpu = timed(lambda: ke.edit(model, tok, case.request, method="rome",
                                                  mom2_n_tokens=args.n_tokens))
        walls.append(result.seconds)
        cpus.append(cpu)
        result.undo()
    print(f"ROME single edit: median wall {statistics.median(walls):.2f} s, median cpu {statistics.median(cpus):.2f} s")
    batch = ke.load_counterfact("val", n=args.memit_batch, seed=1)
    result, wall, cpu = timed(lambda: ke.edit(model, tok, [c.request for c in batch], method="memit",
                                              mom2_n_tokens=args.n_tokens))
    result.undo()
    print(f"MEMIT batch of {len(batch)}: wall {result.seconds:.2f} s, cpu {cpu:.2f} s")


if __name__ == "__main__":
    main()
