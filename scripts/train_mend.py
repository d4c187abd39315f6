"""Meta-train MEND's editor on CounterFact's train split and save it as safetensors (chapter 6).

    python scripts/train_mend.py --steps 600 --out kedit_lite/checkpoints/mend_smollm2.safetensors
    python scripts/train_mend.py --resume kedit_lite/checkpoints/mend_smollm2.safetensors --max-seconds 1800 ...

Every field of `kedit_lite.mend.TrainConfig` is a flag (`--c-loc 3`), with the default stated there once.
`python -m kedit_lite.mend train ...` runs this script too. A JSON record of the run is written beside --out.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from kedit_lite import mend


def parse(argv):
    """Flags: one per TrainConfig field, then what only this script needs (data, model, output, resuming)."""
    parser = argparse.ArgumentParser(prog="python scripts/train_mend.py", description=__doc__.splitlines()[0])
    for field in dataclasses.fields(mend.TrainConfig):
        kind = float if field.name == "max_seconds" else type(field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default)
    parser.add_argument("--n-train", type=int, default=None, help="use only the first N training records")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=str(mend.DEFAULT_CHECKPOINT))
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps")
    parser.add_argument("--resume", default=None, help="continue training from this checkpoint")
    args = parser.parse_args(argv)
    cfg = mend.TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(mend.TrainConfig)})
    return args, cfg


def run_record(argv, args, cfg, cases, history, editor, cpu_seconds, previous):
    """What the run did (command, data, options, losses, time), chained to the sitting it resumed."""
    tail = history[-50:]
    record = {"command": "python scripts/train_mend.py " + " ".join(argv),
              "data": f"CounterFact train split via ke.load_counterfact('train'): {len(cases)} records",
              "hparams": {**dataclasses.asdict(cfg), "n_train": args.n_train, "model": args.model},
              "steps_run": len(history), "wall_seconds": round(history[-1]["seconds"], 1),
              "cpu_seconds": round(cpu_seconds, 1), "torch_threads": torch.get_num_threads(),
              "first_losses": {"edit": history[0]["edit"], "loc": history[0]["loc"]},
              "final_losses_mean_last_50": {k: sum(h[k] for h in tail) / len(tail) for k in ("edit", "loc")},
              "step_sizes": [round(v, 6) for v in editor.log_lr.exp().tolist()],
              "history_every_10": [h for h in history if h["step"] % 10 == 0], "resumed_from": previous}
    previous = previous or {}
    record["total_steps"] = len(history) + previous.get("total_steps", previous.get("steps_run", 0))
    record["total_cpu_seconds"] = record["cpu_seconds"] + previous.get("total_cpu_seconds",
                                                                       previous.get("cpu_seconds", 0))
    return record


def main(argv=None):
    """Train (or resume), save the editor and its record, print the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["train"] else argv    # `python -m kedit_lite.mend train ...`
    args, cfg = parse(argv)
    from kedit_lite.data import load_counterfact
    from kedit_lite.models import load_model
    model, tok = load_model(args.model)
    cases = load_counterfact("train", n=args.n_train)
    cpu0 = time.process_time()
    editor, previous = mend.MENDEditor.for_model(model, cfg.n_layers, cfg.rank, cfg.lr_init), None
    if args.resume:  # continue a run: start from its editor (statistics included); keep its record
        editor = mend.load_editor(args.resume)
        editor.check_model(model)
        record_path = Path(args.resume).with_suffix(".json")
        previous = json.loads(record_path.read_text()) if record_path.exists() else None

    def log(row):
        if row["step"] % args.log_every == 0 or row["step"] == 1:
            print(f"step {row['step']:5d}  edit {row['edit']:.3f}  loc {row['loc']:.4f}  {row['seconds']:.0f}s "
                  f"cpu {time.process_time() - cpu0:.0f}s", flush=True)
        if args.save_every and row["step"] % args.save_every == 0:  # a usable checkpoint even if stopped early
            mend.save_editor(editor, args.out, extra={"steps": row["step"], "c_loc": cfg.c_loc})
    editor, history = mend.train(model, tok, cases, cfg, editor=editor, log=log)
    record = run_record(argv, args, cfg, cases, history, editor, time.process_time() - cpu0, previous)
    mend.save_editor(editor, args.out, extra={"steps": record["total_steps"], "c_loc": cfg.c_loc})
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "history_every_10"}, indent=1))


if __name__ == "__main__":
    main()
