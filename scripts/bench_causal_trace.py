"""Benchmark causal tracing (chapter 4): the plain per-state loop vs the fast exact trace, same prompt and noise.

    python scripts/bench_causal_trace.py                      # ~10-token prompt, 10 noise samples, kind=hidden
    python scripts/bench_causal_trace.py --samples 3 --kind mlp --no-three-kinds

Prints the reference loop's wall time, the fast trace's, the speed-up, the max abs difference of the two
probability grids, and the time of a full three-kind fast trace. Timings on a shared CPU are noisy: the load
average is printed alongside, and so is the process CPU time, which with `--threads 1` hardly depends on what
else runs on the machine (with more threads it also counts threads waiting for each other).
"""
import argparse
import os
import time

import torch

import kedit_lite as ke
from kedit_lite import tracing as ct


def timed(fn):
    """(result, wall seconds, process CPU seconds) of fn()."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face name; default: the embedded SmolLM2")
    parser.add_argument("--prompt", default="The Space Needle is located in the city of")
    parser.add_argument("--subject", default="The Space Needle")
    parser.add_argument("--kind", default="hidden", choices=ct.KINDS)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference loop")
    parser.add_argument("--no-three-kinds", action="store_true", help="skip the three-kind timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok = ke.load_model(args.model)
    n_tokens = len(tok(args.prompt, add_special_tokens=False).input_ids)
    print(f"model={ke.models.model_name(model)} device={next(model.parameters()).device} "
          f"torch_threads={torch.get_num_threads()} load_avg={os.getloadavg()[0]:.1f}")
    print(f"prompt={args.prompt!r} ({n_tokens} tokens) subject={args.subject!r} kind={args.kind} "
          f"samples={args.samples} window={args.window} layers={ke.num_layers(model)}")
    kw = dict(kind=args.kind, samples=args.samples, window=args.window, seed=0)
    ct.embedding_std(model, tok)  # σ is computed once per model; keep it out of both timings
    fast, t_fast, c_fast = timed(lambda: ke.causal_trace(model, tok, args.prompt, subject=args.subject, **kw))
    print(f"fast trace:      {t_fast:8.1f} s   (cpu {c_fast:.1f} s)   answer={fast.answer!r} low={fast.low:.4f} "
          f"high={fast.high:.4f}   load_avg={os.getloadavg()[0]:.1f}", flush=True)
    if not args.no_reference:
        ref, t_ref, c_ref = timed(lambda: ct.reference_trace(model, tok, args.prompt, args.subject, **kw))
        diff = (fast.scores - ref.scores).abs().max().item()
        print(f"reference loop:  {t_ref:8.1f} s   (cpu {c_ref:.1f} s; {t_ref / ref.scores.numel():.2f} s per state)")
        print(f"speed-up:        {t_ref / t_fast:8.1f} x   (cpu {c_ref / c_fast:.1f} x)   max |fast - reference| = "
              f"{diff:.2e}   load_avg={os.getloadavg()[0]:.1f}", flush=True)
    if not args.no_three_kinds:
        total = 0.0
        for kind in ct.KINDS:
            _, seconds, cpu = timed(lambda: ke.causal_trace(model, tok, args.prompt, subject=args.subject, kind=kind,
                                                            samples=args.samples, window=args.window))
            total += seconds
            print(f"  {kind:6s} trace:  {seconds:8.1f} s   (cpu {cpu:.1f} s)", flush=True)
        print(f"three kinds:     {total:8.1f} s   load_avg={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
