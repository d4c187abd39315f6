"""Benchmark harness: edit N cases one by one (or in batches), score before/after, undo, and print a table.

    python -m kedit_lite.bench --method ft --data counterfact --split val --n 20 [--json out.json]
    python -m kedit_lite.bench --all --data counterfact --n 50

Every method in kedit_lite.METHODS plugs in through `ke.edit`; chapter 8 renders the `--all` table.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from .data import load_cases
from .editing import METHODS, edit, get_method
from .metrics import KINDS, evaluate, summarize
from .models import load_model, model_name
from .requests import EditError


def run_method(model, tok, cases, method, batch_size=1, generation=True, hparams=None):
    """Edit `cases` with `method`, `batch_size` requests per edit; return per-case scores and per-edit costs."""
    hparams = hparams or {}
    befores = [evaluate(model, tok, c, generation=generation) for c in tqdm(cases, desc="before", leave=False)]
    afters, seconds, memory = [], [], []
    eval_seconds, n_queries = 0.0, 0  # cost of asking the edited model (IKE pays it on every query)
    for i in tqdm(range(0, len(cases), batch_size), desc=method, leave=False):
        chunk = cases[i:i + batch_size]
        result = edit(model, tok, [c.request for c in chunk] if batch_size > 1 else chunk[0].request,
                      method=method, **hparams)
        seconds.append(result.seconds)
        memory.append(result.peak_memory_mb)
        for case, before in zip(chunk, befores[i:i + batch_size]):
            start = time.perf_counter()
            afters.append(result.evaluate(model, tok, case, before=before, generation=generation))
            eval_seconds += time.perf_counter() - start
            n_queries += sum(len(rows) for rows in afters[-1]["details"].values())
        result.undo()
    return {"method": method, "n": len(cases), "batch_size": batch_size, "before": summarize(befores),
            "after": summarize(afters), "median_seconds_per_edit": statistics.median(seconds),
            "seconds_per_request": sum(seconds) / len(cases), "peak_memory_mb": max(memory),
            "eval_seconds_per_query": eval_seconds / max(n_queries, 1),
            "per_case": [{k: v for k, v in a.items() if k != "details"} for a in afters]}


def format_table(results):
    """Plain-text table: one row per metric, one column per method."""
    keys = [f"{kind}.{mode}" for kind in KINDS for mode in ("token_acc", "gen", "prob_wins")
            if any(f"{kind}.{mode}" in r["after"] for r in results)]
    head = ["metric"] + [r["method"] for r in results]
    rows = [[k] + [f"{r['after'][k]:.3f}" if k in r["after"] else "-" for r in results] for k in keys]
    rows.append(["median s/edit"] + [f"{r['median_seconds_per_edit']:.3f}" for r in results])
    rows.append(["eval s/query"] + [f"{r.get('eval_seconds_per_query', float('nan')):.3f}" for r in results])
    rows.append(["peak extra MB/edit"] + [f"{r['peak_memory_mb']:.1f}" for r in results])
    rows.append(["edits x batch"] + [f"{r['n'] // r['batch_size']}x{r['batch_size']}" for r in results])
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    line = lambda row: "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kedit_lite.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", help=f"one of {sorted(METHODS)}; repeatable")
    parser.add_argument("--all", action="store_true", help="every method available in this version")
    parser.add_argument("--data", default="counterfact", choices=["counterfact", "zsre", "lecture"])
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--n", type=int, default=20, help="number of edit cases")
    parser.add_argument("--seed", type=int, default=None, help="sample cases at random with this seed")
    parser.add_argument("--batch-size", type=int, default=None, help="requests per edit (memit default: all)")
    parser.add_argument("--model", default=None, help="model name or directory (default: embedded SmolLM2)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--hparams", default="{}", help='JSON dict of method options, e.g. \'{"layers": 4}\'')
    parser.add_argument("--no-generation", action="store_true", help="skip greedy-generation scores (faster)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args(argv)
    methods = list(METHODS) if args.all else (args.method or ["ft"])
    try:
        hparams = json.loads(args.hparams)
    except json.JSONDecodeError as err:
        parser.error(f"--hparams: not valid JSON ({err})")
    available = []
    for m in methods:
        try:
            get_method(m)
            available.append(m)
        except EditError as err:
            if not args.all:
                parser.error(str(err))
            print(f"skipping {m}: {err}", file=sys.stderr)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    cases = load_cases(args.data, split=args.split, n=args.n, seed=args.seed)
    results = []
    for method in available:
        batch = args.batch_size or (len(cases) if method == "memit" else 1)
        start = time.perf_counter()
        results.append(run_method(model, tok, cases, method, batch, not args.no_generation, hparams))
        results[-1]["wall_seconds"] = time.perf_counter() - start
    print(f"model={model_name(model)} data={args.data}/{args.split} n={len(cases)} "
          f"device={next(model.parameters()).device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(format_table(results))
    if args.json:
        meta = {"model": model_name(model), "data": args.data, "split": args.split, "n": len(cases),
                "device": str(next(model.parameters()).device), "platform": platform.platform(),
                "torch": torch.__version__, "hparams": hparams}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
