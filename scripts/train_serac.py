"""Train SERAC's scope classifier on CounterFact train, score it on CounterFact val, save it as safetensors (chapter 3).

    python scripts/train_serac.py --out kedit_lite/checkpoints/serac_scope.safetensors

Every field of `kedit_lite.serac.TrainConfig` is a flag (`--steps 3000`), with its default stated there once. The
MiniLM embeddings of the texts are cached in $KEDIT_CACHE/retrieval, so a rerun skips them. A JSON record of the
run (data, options, steps, time, val precision/recall/F1 at the threshold) is written beside --out.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from kedit_lite import serac


def parse(argv):
    """Flags: one per TrainConfig field, then the data sizes, the threshold scored at and the output path."""
    parser = argparse.ArgumentParser(prog="python scripts/train_serac.py", description=__doc__.splitlines()[0])
    for field in dataclasses.fields(serac.TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    parser.add_argument("--n-train", type=int, default=None, help="use only the first N training records")
    parser.add_argument("--n-val", type=int, default=None, help="score on only the first N val records")
    parser.add_argument("--threshold", type=float, default=serac.PAPER_THRESHOLD)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(serac.DEFAULT_CHECKPOINT))
    args = parser.parse_args(argv)
    cfg = serac.TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(serac.TrainConfig)})
    return args, cfg


def embedded(split, n, cfg):
    """CounterFact `split` as scope pairs, with the MiniLM embeddings of their queries and edits."""
    from kedit_lite.data import load_counterfact
    from kedit_lite.retrieval import cached_embed
    cases = load_counterfact(split, n=n)
    edits = cached_embed([serac.scope_text(c.request) for c in cases])
    data = serac.scope_pairs(cases, edits, cfg.n_random, cfg.seed)
    return cases, data, cached_embed(data["queries"]), edits


def main(argv=None):
    """Embed, train, score on val, save the classifier and its record, print the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse(argv)
    torch.set_num_threads(args.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    train_cases, train, train_q, train_e = embedded("train", args.n_train, cfg)
    val_cases, val, val_q, val_e = embedded("val", args.n_val, cfg)
    embed_seconds = time.perf_counter() - start

    def log(row):
        if row["step"] % 500 == 0 or row["step"] == 1:
            print(f"step {row['step']:5d}  loss {row['loss']:.4f}  {row['seconds']:.0f}s", flush=True)
    classifier, history = serac.train_classifier(train_q, train_e, train, cfg, log=log)
    scores = {"val": serac.scope_metrics(classifier, val_q, val_e, val, args.threshold),
              "train": serac.scope_metrics(classifier, train_q, train_e, train, args.threshold)}
    tail = history[-100:]
    record = {"command": "python scripts/train_serac.py " + " ".join(argv),
              "data": {"train": f"CounterFact train via ke.load_counterfact('train'): {len(train_cases)} records, "
                                f"{len(train['kinds'])} pairs", "val": f"CounterFact val: {len(val_cases)} records, "
                                                                       f"{len(val['kinds'])} pairs"},
              "pairs": "in scope: the edit prompt, its paraphrase; out: its neighbourhood prompt, the nearest other "
                       "edit's prompt, n_random random other prompts", "encoder": "all-MiniLM-L6-v2 (retrieval.embed)",
              "hparams": dataclasses.asdict(cfg), "steps_run": len(history),
              "embed_seconds": round(embed_seconds, 1), "train_seconds": round(history[-1]["seconds"], 1),
              "wall_seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu0, 1),
              "torch_threads": torch.get_num_threads(), "first_loss": history[0]["loss"],
              "final_loss_mean_last_100": sum(h["loss"] for h in tail) / len(tail), "scores": scores}
    classifier.meta = {"name": Path(args.out).stem, "steps": len(history), "val": scores["val"]}
    serac.save_classifier(classifier, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
