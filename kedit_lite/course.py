"""Notebook plumbing shared by every chapter: switches, seeds, device, and small display helpers.

Neutral switches scale a chapter up without editing it:
    KEDIT_MODEL=gpt2-xl      a bigger Hugging Face model (online, best on a GPU); unset = embedded SmolLM2
    KEDIT_FULL_RUN=1         the full experiment instead of the fast default path
    KEDIT_DATA=counterfact   experiments on CounterFact (the default under KEDIT_FULL_RUN=1); unset = the shipped
                             course facts, so the default path needs no data directory and no network
"""
import os
import random
import sys
from dataclasses import dataclass

import torch

REPOSITORY = "https://github.com/kedit-lite/model-editing-hands-on"
BRANCH = "main"


@dataclass
class CourseConfig:
    model: str          # None means the embedded default (SmolLM2-135M-Instruct)
    device: torch.device
    full_run: bool
    in_colab: bool
    seed: int
    data: str = "course"  # where the chapters' experiment cases come from: "course" (shipped) or "counterfact"


def seed_everything(seed=0):
    """Seed python, numpy and torch so notebook outputs are reproducible."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def setup(seed=0, model=None):
    """Read the switches, seed everything, pick the device, and set plotting defaults (every chapter's first cell)."""
    from .models import pick_device
    seed_everything(seed)
    torch.set_grad_enabled(True)
    try:
        import matplotlib
        matplotlib.rcParams.update({"figure.figsize": (7, 3.5), "figure.dpi": 100, "axes.grid": True,
                                    "font.size": 10})
    except ImportError:
        pass
    full_run = os.environ.get("KEDIT_FULL_RUN", "0") == "1"
    data = os.environ.get("KEDIT_DATA") or ("counterfact" if full_run else "course")
    if data not in DATA_SOURCES:
        raise ValueError(f"KEDIT_DATA: unknown data {data!r}; use one of {sorted(DATA_SOURCES)}")
    cfg = CourseConfig(model=model or os.environ.get("KEDIT_MODEL") or None, device=pick_device(),
                       full_run=full_run, in_colab="google.colab" in sys.modules, seed=seed, data=data)
    print(f"model={cfg.model or 'SmolLM2-135M-Instruct (embedded)'}  device={cfg.device}  "
          f"full_run={cfg.full_run}  data={DATA_SOURCES[data]}  torch={torch.__version__}")
    return cfg


DATA_SOURCES = {"course": "course facts (shipped, written for the course)",
                "counterfact": "CounterFact (KEDIT_DATA_DIR or download)"}


def facts(cfg, split="val", n=None, seed=None):
    """A chapter's experiment cases: the shipped course facts, or CounterFact when cfg.data says so."""
    from .data import load_cases
    return load_cases(cfg.data, split=split, n=n, seed=seed)


def colab_url(notebook_path, repository=REPOSITORY, branch=BRANCH):
    """The 'Open in Colab' link for a notebook path inside the repository."""
    return f"https://colab.research.google.com/github/{repository.split('github.com/')[1]}/blob/{branch}/{notebook_path}"


def scores_frame(scores_by_label):
    """A tidy DataFrame from {label: evaluate() result}: rows = metric kinds, columns = label x mode."""
    import pandas as pd
    from .metrics import KINDS
    rows = {}
    for label, scores in scores_by_label.items():
        for kind in KINDS:
            for mode, value in scores.get(kind, {}).items():
                rows.setdefault(kind, {})[(label, mode)] = value
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame.round(3)


def probe_frame(scores, kinds=None):
    """Per-probe table of one evaluate() result: prompt, expected answer, what greedy decoding said, scores."""
    import pandas as pd
    rows = []
    for kind, items in scores["details"].items():
        if kinds and kind not in kinds:
            continue
        for r in items:
            rows.append({"kind": kind, "prompt": r["prompt"], "answer": r["answer"],
                         "generated": (r["generated"] or "").strip(), "token_acc": round(r["token_acc"], 3),
                         "gen": r["gen"]})
    return pd.DataFrame(rows)


def show_code(*functions):
    """Show library functions' source in a chapter (the reference implementations beside their derivation)."""
    import inspect
    text = "\n\n".join(inspect.getsource(f).rstrip() for f in functions)
    try:
        from IPython.display import Markdown, display
        display(Markdown(f"```python\n{text}\n```"))
    except ImportError:
        print(text)
