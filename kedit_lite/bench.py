"""Benchmark harness: edit N cases one by one (or in batches), score before/after, undo, and print a table.

    python -m kedit_lite.bench --method ft --data counterfact --split val --n 20 [--json out.json] [--markdown]
    python -m kedit_lite.bench --all --data counterfact --split val --n 50 --json book/results/counterfact_val.json
    python -m kedit_lite.bench --method rome --method rome+ours --n 50   # the paper's ROME beside our options

Every method in kedit_lite.METHODS plugs in through `ke.edit`; chapter 9 (09_method_comparison) reads the JSON
that `--all --json` writes and compares the methods on reliability, generalization, locality and efficiency.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_cases
from .editing import METHODS, check_options, get_method
from .metrics import KINDS, evaluate, score_edit, summarize
from .models import load_model, model_name, pick_device
from .requests import EditError

SCHEMA = 2  # version of the JSON layout written by main(); chapter 9 checks it
MODES = ("token_acc", "gen", "prob_wins")
# Requests per edit() call when --batch-size is not given: MEMIT is *the* batch method (chapter 5), so it writes
# all n facts in one update; every other method gets one fact per call, the setting its paper reports.
DEFAULT_BATCH = {"memit": "all"}
RESULTS_DIR = Path(__file__).resolve().parent.parent / "book" / "results"


def default_batch_size(method, n):
    """Requests per edit for `method` on n cases when the user gives no --batch-size (chapter 5: MEMIT batches)."""
    return n if DEFAULT_BATCH.get(method) == "all" else int(DEFAULT_BATCH.get(method, 1))


def _what_changes(model, scored):
    """How an edit changed the model (chapter 1's map): weights moved, modules added, a prompt prepended."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    touched = scored.result.touched
    return {"changes_weights": bool(touched), "touched_tensors": len(touched),
            "touched_parameters": sum(sizes[n] for n in touched),
            "adds_modules": scored.result.adds_modules, "uses_context": bool(scored.context)}


OURS = "+ours"   # "rome+ours": the method with the options the course adds to the paper's (its module's IMPROVED)


def variants():
    """Method names with our options: "<method>+ours" for each method whose module defines IMPROVED."""
    return [m + OURS for m in METHODS if hasattr(get_method(m), "IMPROVED")]


def method_and_options(spec, hparams=None):
    """("rome", {our options, then hparams}) for "rome+ours"; (spec, hparams) for a plain method name."""
    hparams = dict(hparams or {})
    if spec.endswith(OURS):
        base = spec[:-len(OURS)]
        improved = getattr(get_method(base), "IMPROVED", None)
        if improved is None:
            raise EditError(f"method: {base!r} has no options of ours; drop {OURS!r}")
        return base, {**improved, **hparams}
    return spec, hparams


def hparams_for(method, hparams):
    """Options for one method: {"steps": 10} applies to every method, {"ft": {"steps": 10}} only to FT."""
    if hparams and all(k in METHODS or k.endswith(OURS) for k in hparams):
        return dict(hparams.get(method) or {})
    return dict(hparams or {})


def _prompts_scored(scores):
    """Prompts one evaluate() call ran through the model: every probe, plus each P(true) it was compared with."""
    return sum(len(rows) + sum("logprob_true" in r for r in rows) for rows in scores["details"].values())


def score_before(model, tok, cases, generation=True):
    """The unedited model's scores on every case (shared by all methods: locality compares with them)."""
    return [evaluate(model, tok, c, generation=generation) for c in tqdm(cases, desc="before", leave=False)]


def run_method(model, tok, cases, method, batch_size=1, generation=True, hparams=None, befores=None):
    """Edit `cases` with `method`, `batch_size` requests per edit; return per-case scores and per-edit costs."""
    label = method
    method, hparams = method_and_options(method, hparams)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise EditError(f"batch_size: expected a positive integer, got {batch_size!r}")
    start_all = time.perf_counter()
    befores = befores if befores is not None else score_before(model, tok, cases, generation)
    afters, seconds, memory = [], [], []
    eval_seconds, n_queries, changes = 0.0, 0, None
    for i in tqdm(range(0, len(cases), batch_size), desc=method, leave=False):
        chunk = cases[i:i + batch_size]
        # the chunk's requests go to one edit() call (MEMIT solves them jointly), then each case is scored
        scored = score_edit(model, tok, chunk, method, befores[i:i + batch_size], generation, **hparams)
        seconds.append(scored.seconds)
        memory.append(scored.result.peak_memory_mb)
        changes = changes or _what_changes(model, scored)
        # cost of asking the edited model: IKE pays it on every query (its context makes each prompt longer)
        eval_seconds += scored.eval_seconds
        n_queries += sum(_prompts_scored(a) for a in scored.after)
        afters += scored.after
    per_case = [dict({k: v for k, v in a.items() if k != "details"}, id=c.meta.get("id"))
                for a, c in zip(afters, cases)]
    return {"method": label, "options": hparams, "n": len(cases), "batch_size": batch_size, "n_edits": len(seconds),
            "how": (get_method(method).apply.__doc__ or "").strip().splitlines()[0], **changes,
            "before": summarize(befores), "after": summarize(afters),
            "median_seconds_per_edit": statistics.median(seconds), "seconds_per_request": sum(seconds) / len(cases),
            "seconds_per_edit": seconds, "peak_memory_mb": max(memory),
            "eval_seconds_per_query": eval_seconds / max(n_queries, 1), "n_queries": n_queries,
            "wall_seconds": time.perf_counter() - start_all, "per_case": per_case}


def paired_difference(a, b, score="paraphrase.token_acc"):
    """a − b on the same cases: mean per-case difference, its standard error, cases that differ (chapter 9).

    `a`, `b`: two results of run_method (or of a bench JSON) on the same cases; `score`: 'kind.mode'. Pairing
    removes what the cases share (an easy case is easy for both), so the error is that of the difference itself.
    """
    kind, _, mode = score.partition(".")
    if kind not in KINDS or mode not in MODES:
        raise ValueError(f"score: expected 'kind.mode' with kind in {KINDS} and mode in {MODES}, got {score!r}")
    ids_a, ids_b = [c.get("id") for c in a["per_case"]], [c.get("id") for c in b["per_case"]]
    if ids_a != ids_b:
        raise ValueError(f"b: its {len(ids_b)} cases are not a's {len(ids_a)} in the same order; compare two runs "
                         f"on the same cases (same --data, --split, --n and --seed)")
    if len(ids_a) < 2:
        raise ValueError(f"a: a standard error needs 2 or more cases, got {len(ids_a)}")
    try:
        diffs = [ca[kind][mode] - cb[kind][mode] for ca, cb in zip(a["per_case"], b["per_case"])]
    except KeyError as err:
        raise ValueError(f"score: {score!r} was not measured in both runs (run with generation for '.gen')") from err
    return {"difference": statistics.mean(diffs), "standard_error": statistics.stdev(diffs) / len(diffs) ** 0.5,
            "cases_differ": sum(d != 0 for d in diffs), "n": len(diffs)}


def metric_keys(results):
    """The 'kind.mode' scores present in any result, in KINDS x MODES order (chapter 2's metrics)."""
    keys = [f"{kind}.{mode}" for kind in KINDS for mode in MODES]
    return [k for k in keys if any(k in r["after"] for r in results)]


def _rows(results):
    """The table's cells as strings: scores, then costs, then how the model was changed."""
    rows = [[k] + [f"{r['after'][k]:.3f}" if k in r["after"] else "-" for r in results] for k in metric_keys(results)]
    rows.append(["median s/edit"] + [f"{r['median_seconds_per_edit']:.3f}" for r in results])
    rows.append(["s/request"] + [f"{r.get('seconds_per_request', r['median_seconds_per_edit']):.3f}" for r in results])
    rows.append(["eval s/query"] + [f"{r.get('eval_seconds_per_query', float('nan')):.3f}" for r in results])
    rows.append(["peak extra MB/edit"] + [f"{r['peak_memory_mb']:.1f}" for r in results])
    rows.append(["edits x batch"] + [f"{r.get('n_edits', r['n'] // r['batch_size'])}x{r['batch_size']}"
                                     for r in results])
    if all("changes_weights" in r for r in results):
        rows.append(["changes weights"] + ["yes" if r["changes_weights"] else "no" for r in results])
    return rows


def format_table(results, markdown=False):
    """One row per metric, one column per method: aligned plain text, or a GitHub markdown table (chapter 9)."""
    head = ["metric"] + [r["method"] for r in results]
    rows = _rows(results)
    if markdown:
        line = lambda row: "| " + " | ".join(str(c) for c in row) + " |"
        return "\n".join([line(head), "|" + "|".join(["---"] + ["--:"] * len(results)) + "|"]
                         + [line(r) for r in rows])
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    line = lambda row: "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _git(*args):
    """Output of a git command run beside this file, or None outside a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model():
    """The CPU's marketing name (Linux /proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(model):
    """Where the numbers were measured: platform, CPUs, threads, GPU, library versions (chapter 9 prints it)."""
    import transformers
    from . import __version__
    device = next(model.parameters()).device
    status = _git("status", "--porcelain", "--", ".")
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": _cpu_model(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kedit_lite": __version__,
            "git_commit": _git("rev-parse", "HEAD"), "library_modified": None if status is None else bool(status),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _parser():
    parser = argparse.ArgumentParser(prog="python -m kedit_lite.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append",
                        help=f"one of {sorted(METHODS)}, or e.g. rome{OURS} (with the course's options); repeatable")
    parser.add_argument("--all", action="store_true", help=f"every method available in this version, and each{OURS}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data", default="counterfact", choices=["counterfact", "course", "zsre", "lecture"])
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--n", type=int, default=20, help="number of edit cases")
    parser.add_argument("--seed", type=int, default=None, help="sample cases at random with this seed")
    parser.add_argument("--batch-size", type=int, default=None, help="requests per edit (default: 1; memit: all n)")
    parser.add_argument("--model", default=None, help="model name or directory (default: embedded SmolLM2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--hparams", default="{}",
                        help='JSON method options: \'{"steps": 10}\' for all, \'{"ft": {"steps": 10}}\' per method')
    parser.add_argument("--no-generation", action="store_true", help="skip greedy-generation scores (faster)")
    parser.add_argument("--json", default=None, help="write the results (with machine info) to this path")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--update", default=None, metavar="JSON",
                        help="rerun only these methods on the cases of an existing results JSON and replace their "
                             "rows there (the file's meta.reruns records the command)")
    return parser


def _methods(parser, args):
    """The methods to run: --all (skipping unavailable ones with a note) or each --method (errors are fatal)."""
    available = []
    for m in (list(METHODS) + variants() if args.all else (args.method or ["ft"])):
        try:
            method_and_options(m)
            available.append(m)
        except EditError as err:
            if not args.all:
                parser.error(str(err))
            print(f"skipping {m}: {err}", file=sys.stderr)
    return available


def _parse(argv):
    """Parsed and checked arguments, with --hparams decoded; bad values exit naming the flag."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n: expected a positive number of cases, got {args.n}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive integer, got {args.threads}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: expected a positive integer, got {args.batch_size}")
    try:
        args.hparams = json.loads(args.hparams)
    except json.JSONDecodeError as err:
        parser.error(f"--hparams: not valid JSON ({err})")
    if not isinstance(args.hparams, dict):
        parser.error(f"--hparams: expected a JSON object like '{{\"steps\": 10}}', got {json.dumps(args.hparams)}")
    args.methods = _methods(parser, args)
    if args.update:
        _check_update(parser, args)
    refused = []
    for method in args.methods:
        try:
            check_options(*method_and_options(method, hparams_for(method, args.hparams)))
        except EditError as err:
            refused.append(str(err))
    # --all tolerates options only some methods take (the others fail and are reported); none taking them is a typo
    if refused and (not args.all or len(refused) == len(args.methods)):
        parser.error(f"--hparams: {refused[0]}")
    try:
        pick_device(args.device)
    except ValueError as err:
        parser.error(f"--{err}")
    return args


# What must match between a rerun and the file it updates, so every row of the file scores the same cases.
SAME_CASES = ("data", "split", "n", "seed", "generation")


def _check_update(parser, args):
    """--update: the file exists and was run on the same cases as these arguments ask for."""
    path = Path(args.update)
    if not path.exists():
        parser.error(f"--update: {path} does not exist; write it first with --json {path}")
    old = json.loads(path.read_text(encoding="utf-8"))["meta"]
    asked = {"data": args.data, "split": None if args.data == "lecture" else args.split, "n": args.n,
             "seed": args.seed, "generation": not args.no_generation}
    for key in SAME_CASES:
        if old.get(key) != asked[key]:
            parser.error(f"--update: {path} has {key}={old.get(key)!r} but this run asks for {asked[key]!r}; "
                         f"pass the same --data/--split/--n/--seed/--no-generation as its command: {old['command']}")


def merged_results(old, new_meta, results):
    """`old` (a results JSON) with the rows of `results` replaced or added, and the rerun recorded in meta.reruns."""
    rows = {r["method"]: r for r in old["results"]}
    rows.update({r["method"]: r for r in results})
    meta = dict(old["meta"])
    reruns = meta.pop("reruns", [])
    if "rerun" in meta:                      # the single record of earlier files
        reruns = [meta.pop("rerun")] + reruns
    keep = ("command", "date", "git_commit", "library_modified", "torch_threads", "load_average", "wall_seconds")
    reruns.append({"methods": [r["method"] for r in results], **{k: new_meta.get(k) for k in keep}})
    order = list(meta["methods"]) + [m for m in rows if m not in meta["methods"]]
    failed = {m: why for m, why in meta.get("failed", {}).items() if m not in new_meta["methods"]}
    meta.update(methods=order, reruns=reruns, failed={**failed, **new_meta["failed"]})
    return {"meta": meta, "results": [rows[m] for m in order if m in rows]}


def _meta(args, command, started, model, results, failed):
    """What was run, on what, when: everything chapter 9 prints above its tables."""
    return {"schema": SCHEMA, "command": command, "date": started.isoformat(timespec="seconds"),
            "model": model_name(model), "model_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "data": args.data,
            "split": None if args.data == "lecture" else args.split, "n": results[0]["n"] if results else args.n,
            "seed": args.seed, "generation": not args.no_generation, "batch_size": args.batch_size,
            "default_batch": DEFAULT_BATCH, "hparams": args.hparams, "methods": [r["method"] for r in results],
            "failed": failed, **machine_info(model),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "wall_seconds": (datetime.now(timezone.utc) - started).total_seconds()}


def main(argv=None):
    """The command line: run the methods, print the table, write the JSON chapter 9 reads."""
    args = _parse(argv)
    command = "python -m kedit_lite.bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    started = datetime.now(timezone.utc)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    cases = load_cases(args.data, split=args.split, n=args.n, seed=args.seed)
    results, failed = [], {}
    befores = score_before(model, tok, cases, not args.no_generation)  # once: every method starts from this model
    for method in args.methods:
        batch = args.batch_size or default_batch_size(method_and_options(method)[0], len(cases))
        try:
            results.append(run_method(model, tok, cases, method, batch, not args.no_generation,
                                      hparams_for(method, args.hparams), befores))
        except Exception as err:  # noqa: BLE001 (with --all, one method's failure must not lose the others' hour)
            if not args.all and isinstance(err, EditError):   # a bad option value: a usage error, not a traceback
                _parser().error(f"--method {method}: {err}")
            if not args.all:
                raise
            failed[method] = f"{type(err).__name__}: {err}"
            print(f"{method} failed: {err}", file=sys.stderr)
    meta = _meta(args, command, started, model, results, failed)
    print(f"model={meta['model']} data={args.data}{'/' + args.split if meta['split'] else ''} n={len(cases)} "
          f"device={meta['device']} torch={meta['torch']} threads={meta['torch_threads']}")
    print(format_table(results, markdown=args.markdown))
    data = {"meta": meta, "results": results}
    if args.update:
        data = merged_results(json.loads(Path(args.update).read_text(encoding="utf-8")), meta, results)
    for path in {p for p in (args.json, args.update) if p}:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return results


def load_results(name, results_dir=None):
    """A JSON written by `main(--json)`: from book/results/ in a checkout, else downloaded (Colab); chapter 9."""
    dirs = [Path(results_dir)] if results_dir else [RESULTS_DIR, Path.cwd() / "book" / "results",
                                                     Path.cwd().parent / "book" / "results"]
    path = next((d / name for d in dirs if (d / name).exists()), dirs[0] / name)
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
    elif results_dir:
        raise FileNotFoundError(f"results_dir: {path} does not exist; write it with python -m kedit_lite.bench "
                                f"... --json {path}")
    else:
        import urllib.request
        from .course import BRANCH, REPOSITORY
        url = f"{REPOSITORY.replace('github.com', 'raw.githubusercontent.com')}/{BRANCH}/book/results/{name}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = json.loads(response.read().decode("utf-8"))
        except OSError as err:
            raise FileNotFoundError(f"name: no {path} and downloading {url} failed ({err}); run the bench with "
                                    f"--json {path} to create it") from err
    if data.get("meta", {}).get("schema") != SCHEMA:
        raise ValueError(f"name: {name} has schema {data.get('meta', {}).get('schema')!r}, this kedit_lite reads "
                         f"schema {SCHEMA}; regenerate it with the command in its meta['command']")
    return data


if __name__ == "__main__":
    main()
