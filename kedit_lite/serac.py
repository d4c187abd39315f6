"""SERAC, memory-based editing (知识缓存法): edits stay beside the model, as text, and a classifier routes (chapter 3).

Mitchell et al. 2022, "Memory-Based Model Editing at Scale" (ICML, arXiv 2206.06520). Three parts: an explicit
edit memory (the requests, stored as text), a scope classifier g(x, e) = P(query x lies in edit e's scope) and a
counterfactual model h(x, e). A query is scored against every edit in memory; when the best score passes 0.5, h
answers with that edit, else the base model answers, untouched. No weight moves; undo drops the edit's entries.
Choices here: h is the base model itself reading the edit as a prompt prefix in IKE's format ("New Fact: <fact>\n
Prompt: "), where the paper trains a separate model; g is a small MLP on [u, v, u*v, |u-v|] of the all-MiniLM-L6-v2
embeddings of query u and edit prompt v (the paper's best g is a trained cross-encoder), trained on CounterFact
train by scripts/train_serac.py, shipped as checkpoints/serac_scope.safetensors with its training record (.json).
An edit's `context` is a Router (prompt -> prefix) over the model's whole memory, so edits made one after another
add up, as in the paper (the same prompt edited again: the newest edit wins the tie); `reference_route` is the
routing written plainly, tested equal to the batched Router. Beyond the paper, off by default (`IMPROVED`):
`demos`, IKE copy/update demonstrations before the edit in h's prefix.
"""
import itertools
import json
import os
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checks, ike
from .caches import Cache
from .requests import EditError
from .tokens import join

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "serac_scope.safetensors"
TRAIN_COMMAND = "python scripts/train_serac.py"
PAPER_THRESHOLD = 0.5        # in scope when g > 0.5 (the paper's rule)
DEMO_MIX = (1, 1, 0)         # copy and update demonstrations: h only ever reads in-scope queries
IMPROVED = {"demos": 4}      # our option: the counterfactual prefix gets 2 copy + 2 update demonstrations
_CLASSIFIERS = Cache("serac classifiers", maxsize=4)   # (resolved path, mtime) -> ScopeClassifier
_MEMORIES = weakref.WeakKeyDictionary()   # model -> EditMemory: live edits, not a cache (clear_caches keeps them)
_EDIT_IDS = itertools.count(1)


# ---------------------------------------------------------------- the scope classifier g (chapter 3)

class ScopeClassifier(nn.Module):
    """g(x, e) = σ(w · relu(W [u, v, u⊙v, |u−v|] + b) + c), u and v the MiniLM embeddings of query and edit."""

    def __init__(self, dim=384, hidden=256, meta=None):
        super().__init__()
        self.dim, self.hidden_size, self.meta = dim, hidden, dict(meta or {})
        self.hidden = nn.Linear(4 * dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, u, v):
        """Logits of paired rows: u (N, dim) queries, v (N, dim) edits -> (N,)."""
        z = torch.cat([u, v, u * v, (u - v).abs()], dim=-1)
        return self.out(torch.relu(self.hidden(z))).squeeze(-1)

    @torch.no_grad()
    def scores(self, queries, keys):
        """P(in scope) of every query against every edit key, (Q, E), in one batched call."""
        q, e = len(queries), len(keys)
        u = queries[:, None, :].expand(q, e, self.dim).reshape(q * e, self.dim)
        v = keys[None, :, :].expand(q, e, self.dim).reshape(q * e, self.dim)
        return torch.sigmoid(self(u, v)).view(q, e)


def save_classifier(classifier, path):
    """Write g as safetensors; its sizes and training summary go in the 'kedit_serac' metadata."""
    from safetensors.torch import save_file
    meta = {**classifier.meta, "dim": classifier.dim, "hidden": classifier.hidden_size}
    state = {k: v.detach().float().cpu().contiguous() for k, v in classifier.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "kedit_serac": json.dumps(meta)})


def load_classifier(path):
    """Read a classifier written by save_classifier (safetensors only, never pickle)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise EditError(f"checkpoint: {path} does not exist; pass the path of a SERAC scope classifier or train one "
                        f"with `{TRAIN_COMMAND} --out <path>`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw, state = (f.metadata() or {}).get("kedit_serac"), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 (safetensors has its own error types for an unreadable file)
        raise EditError(f"checkpoint: {path} is not a safetensors file ({type(err).__name__}: {err}); pass a scope "
                        f"classifier written by `{TRAIN_COMMAND}`") from err
    if raw is None:
        raise EditError(f"checkpoint: {path} is not a kedit_lite SERAC classifier (no 'kedit_serac' metadata)")
    meta = json.loads(raw)
    classifier = ScopeClassifier(meta.pop("dim"), meta.pop("hidden"), meta)
    classifier.load_state_dict(state)
    return classifier.eval()


def _checkpoint_ok(value):
    if value is not None and not isinstance(value, (str, os.PathLike, ScopeClassifier)):
        raise EditError(f"checkpoint: expected a path or a ScopeClassifier, got {type(value).__name__}; pass the path "
                        "of a SERAC scope classifier (or leave it out for the shipped one)")


def get_classifier(checkpoint=None):
    """The classifier to use: an in-memory ScopeClassifier, or a checkpoint path (default: the shipped one), cached."""
    _checkpoint_ok(checkpoint)
    if isinstance(checkpoint, ScopeClassifier):
        return checkpoint
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    mtime = path.stat().st_mtime if path.is_file() else None   # a rewritten file is read again
    return _CLASSIFIERS.get((str(path.resolve()), mtime), lambda: load_classifier(path))


# ---------------------------------------------------------------- options (editing.py builds them)

@dataclass(frozen=True)
class Config:
    """SERAC's options: which scope classifier, its threshold, and (ours) demonstrations in h's prefix."""
    checkpoint: object = None           # a safetensors path, a ScopeClassifier, or None for the shipped classifier
    threshold: float = PAPER_THRESHOLD  # a query is in an edit's scope when g exceeds this
    demos: int = 0                      # beyond the paper: IKE copy/update demonstrations in the prefix (0: off)
    pool: object = None                 # where demonstrations come from: as ike.Config's pool (None: CounterFact)

    def __post_init__(self):
        _checkpoint_ok(self.checkpoint)
        checks.number("threshold", self.threshold, 0, 1, open_low=True, desc="a probability > 0 and < 1",
                      hint="the paper routes to the counterfactual model when g > 0.5")
        if self.threshold == 1:
            raise EditError("threshold: expected a probability > 0 and < 1, got 1; at 1 no query is ever in scope")
        checks.integer("demos", self.demos, 0, hint="0 (the paper: the edit alone) or a few, e.g. 4")
        ike.Config(pool=self.pool)      # the same pools as IKE, refused with the same "pool: ..." errors


# ---------------------------------------------------------------- the edit memory and the router (chapter 3)

def edit_text(request):
    """An edit as the memory stores it: the prompt with its new answer (the fact h reads)."""
    return request.prompt_text + join(request.prompt_text, request.target_new)


def scope_text(request):
    """What g compares a query with: the edit's prompt, its answer left out (a query never contains the answer)."""
    return request.prompt_text


@dataclass(frozen=True)
class MemoryEntry:
    """One edit in memory: the request, the prefix h reads, and the edit() call that added it."""
    request: object
    prefix: str
    edit_id: int

    @property
    def text(self):
        """The edit as text (prompt and new answer)."""
        return edit_text(self.request)

    @property
    def key(self):
        """The text g reads for this edit."""
        return scope_text(self.request)


class EditMemory:
    """A model's edits as text, with their embeddings stacked once (the keys g compares each query with)."""

    def __init__(self, dim=384):
        self.entries, self.keys = [], torch.zeros(0, dim)

    def add(self, entries, keys):
        """Append entries and their (n, dim) key embeddings."""
        self.entries = self.entries + list(entries)
        self.keys = torch.cat([self.keys, keys])

    def remove(self, edit_id):
        """Drop the entries one edit() call added."""
        keep = [i for i, e in enumerate(self.entries) if e.edit_id != edit_id]
        self.entries, self.keys = [self.entries[i] for i in keep], self.keys[keep]

    def __len__(self):
        return len(self.entries)


def memory(model):
    """The model's SERAC edit memory (an empty one if it has none): edit() adds entries, undo() removes them."""
    return _MEMORIES.get(model, EditMemory())


class Router:
    """SERAC's edited model as a prompt prefix: prompt -> the prefix of the best in-scope edit, or '' (base model)."""

    def __init__(self, memory, classifier, threshold=PAPER_THRESHOLD):
        self.memory, self.classifier, self.threshold = memory, classifier, threshold

    def route(self, prompts):
        """Per prompt: (index of the edit h answers with, or None; the best score g gave, or None: empty memory)."""
        if not len(self.memory):
            return [(None, None)] * len(prompts)
        from .retrieval import embed
        scores = self.classifier.scores(embed(list(prompts)), self.memory.keys)     # (Q, E): all pairs at once
        last = scores.shape[1] - 1
        best = last - scores.flip(1).argmax(1)            # argmax, the newest edit winning a tie
        top = scores.gather(1, best[:, None])[:, 0]
        return [(int(i) if s > self.threshold else None, float(s)) for i, s in zip(best, top)]

    def prefixes(self, prompts):
        """The prefix of each prompt: its routed edit's, or '' when no edit is in scope."""
        return ["" if i is None else self.memory.entries[i].prefix for i, _ in self.route(prompts)]

    def __call__(self, prompt):
        """The prefix that makes the base model answer `prompt` as the edited model (metrics.evaluate calls this)."""
        return self.prefixes([prompt])[0]

    def __repr__(self):
        return f"serac.Router({len(self.memory)} edits in memory, threshold={self.threshold})"


@torch.no_grad()
def reference_route(prompt, entries, classifier, threshold=PAPER_THRESHOLD):
    """SERAC's routing plainly (§3): score the query against each edit alone, keep the best, compare to the threshold.

    Returns (prefix, index of the edit used or None, best score or None). No stacked keys, no batching.
    """
    from .retrieval import embed
    u = embed(prompt)[0]
    W, b = classifier.hidden.weight, classifier.hidden.bias
    w, c = classifier.out.weight[0], classifier.out.bias[0]
    best, best_score = None, None
    for i, entry in enumerate(entries):
        v = embed(entry.key)[0]
        z = torch.cat([u, v, u * v, (u - v).abs()])
        score = torch.sigmoid(w @ torch.relu(W @ z + b) + c).item()   # g(x, e_i)
        if best_score is None or score >= best_score:                 # a later edit wins a tie
            best, best_score = i, score
    if best is None or best_score <= threshold:
        return "", None, best_score                                   # out of every scope: the base model answers
    return entries[best].prefix, best, best_score                     # h: the base model reading the edit


# ---------------------------------------------------------------- the method protocol (editing.py)

def touched_parameters(model, requests, cfg):
    """SERAC changes no weight (the classifier is loaded here, so a bad checkpoint fails before anything)."""
    get_classifier(cfg.checkpoint)
    return []


def counterfactual_prefixes(model, tok, requests, cfg):
    """The prefix h reads for each request: IKE's 'New Fact: <fact>\\nPrompt: ', after `demos` demonstrations."""
    if cfg.demos == 0:
        return [ike.build_context(tok, [r], []) for r in requests]
    _, records, embeddings = ike.resolve_pool(cfg.pool)
    out = []
    for r in requests:
        demos = ike.select_demos([r], records, embeddings, cfg.demos, DEMO_MIX)
        demos = ike.fit_to_window(model, tok, [r], demos, False, ike.DEFAULT_RESERVE)[0]
        out.append(ike.build_context(tok, [r], demos))
    return out


def apply(model, tok, requests, cfg):
    """Store each request in the model's edit memory (text, embedding, prefix); the context routes every query."""
    from .retrieval import embed
    classifier = get_classifier(cfg.checkpoint)
    edit_id = next(_EDIT_IDS)
    prefixes = counterfactual_prefixes(model, tok, requests, cfg)
    entries = [MemoryEntry(r, p, edit_id) for r, p in zip(requests, prefixes)]
    keys = embed([e.key for e in entries])
    mem = _MEMORIES.setdefault(model, EditMemory(keys.shape[1]))
    mem.add(entries, keys)
    info = {"entries": [e.text for e in entries], "memory_size": len(mem), "threshold": cfg.threshold,
            "demos": cfg.demos, "prefix_tokens": [len(tok(p, add_special_tokens=False).input_ids) for p in prefixes],
            "classifier": classifier.meta.get("name", "custom")}
    return {"context": Router(mem, classifier, cfg.threshold), "restore": lambda: mem.remove(edit_id), "info": info}


# ---------------------------------------------------------------- training g (chapter 3; scripts/train_serac.py)

@dataclass(frozen=True)
class TrainConfig:
    """Scope-classifier training options (scripts/train_serac.py turns each field into a --flag)."""
    hidden: int = 256           # width of g's hidden layer
    steps: int = 3000           # Adam steps
    batch_size: int = 512       # (query, edit) pairs per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    n_random: int = 2           # random other records' prompts per edit (easy negatives)
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "steps", "batch_size"):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("n_random", self.n_random, 0)
        checks.integer("seed", self.seed, 0)
        checks.learning_rate(self.lr, "lr")
        checks.number("weight_decay", self.weight_decay, 0)


def _nearest_others(keys, subjects, chunk=1024):
    """For each edit, the index of the most similar edit (cosine of keys) about another subject."""
    ids = {s: i for i, s in enumerate(dict.fromkeys(subjects))}
    group = torch.tensor([ids[s] for s in subjects])
    out = []
    for start in range(0, len(keys), chunk):
        sims = keys[start:start + chunk] @ keys.T
        sims[group[start:start + chunk, None] == group[None, :]] = -2.0      # never the same subject
        out += sims.argmax(1).tolist()
    return out


def scope_pairs(cases, keys=None, n_random=2, seed=0):
    """(query, edit) pairs for g from edit cases: {"queries", "edits", "pairs" (N, 2), "labels" (N,), "kinds"}.

    In scope (1): the edit prompt and its paraphrases. Out of scope (0): its neighbourhood prompts (same relation
    and object, another subject: the hard ones), `n_random` other records' prompts and, given the edits' key
    embeddings, the prompt of the nearest edit about another subject.
    """
    rng = random.Random(seed)
    subjects = [c.request.subject.casefold() for c in cases]
    # every prompt of the cases, in a fixed order: the same texts (and cached embeddings) whatever the options
    queries = {t: i for i, t in enumerate(dict.fromkeys(
        t for c in cases for t in [c.request.prompt_text, *(p.prompt for p in [*c.paraphrase, *c.locality])]))}
    rows = []
    add = lambda text, edit, label, kind: rows.append((queries[text], edit, label, kind))
    nearest = _nearest_others(keys, subjects) if keys is not None else [None] * len(cases)
    for i, case in enumerate(cases):
        add(case.request.prompt_text, i, 1.0, "prompt")
        for probe in case.paraphrase:
            add(probe.prompt, i, 1.0, "paraphrase")
        for probe in case.locality:
            add(probe.prompt, i, 0.0, "neighbour")
        if nearest[i] is not None:
            add(cases[nearest[i]].request.prompt_text, i, 0.0, "nearest")
        others = [j for j in rng.sample(range(len(cases)), min(len(cases), n_random + 3)) if subjects[j] != subjects[i]]
        for j in others[:n_random]:
            add(cases[j].request.prompt_text, i, 0.0, "other")
    return {"queries": list(queries), "edits": [scope_text(c.request) for c in cases],
            "pairs": torch.tensor([(q, e) for q, e, _, _ in rows]), "labels": torch.tensor([r[2] for r in rows]),
            "kinds": [r[3] for r in rows]}


def train_classifier(query_emb, edit_emb, data, config=None, log=None, **options):
    """Train g with binary cross-entropy on scope_pairs' pairs (classes weighted equally); returns (g, history)."""
    cfg = checks.config(TrainConfig, options, "serac", base=config)
    torch.manual_seed(cfg.seed)
    classifier = ScopeClassifier(query_emb.shape[1], cfg.hidden).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels, pairs = data["labels"], data["pairs"]
    pos_weight = (labels == 0).sum() / (labels == 1).sum().clamp(min=1)   # equal weight to in and out of scope
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen, history, start = torch.Generator().manual_seed(cfg.seed), [], time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(labels), (min(cfg.batch_size, len(labels)),), generator=gen)
        loss = loss_fn(classifier(query_emb[pairs[idx, 0]], edit_emb[pairs[idx, 1]]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - start})
        if log is not None:
            log(history[-1])
    return classifier.eval(), history


@torch.no_grad()
def scope_metrics(classifier, query_emb, edit_emb, data, threshold=PAPER_THRESHOLD):
    """Precision, recall, F1 of 'in scope' at `threshold` on scope_pairs' pairs, and the in-scope rate per kind."""
    p = torch.sigmoid(classifier(query_emb[data["pairs"][:, 0]], edit_emb[data["pairs"][:, 1]]))
    said, truth = p > threshold, data["labels"] > 0.5
    tp, fp, fn = (said & truth).sum().item(), (said & ~truth).sum().item(), (~said & truth).sum().item()
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    kinds = data["kinds"]
    by_kind = {k: round(sum(bool(s) for s, kk in zip(said, kinds) if kk == k) / kinds.count(k), 4)
               for k in dict.fromkeys(kinds)}
    return {"threshold": threshold, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4), "n_pairs": len(kinds),
            "n_in_scope": int(truth.sum()), "in_scope_rate_by_kind": by_kind}
