"""IKE, in-context knowledge editing (编辑不动参数): demonstrations teach the new fact, no weight moves (chapter 3).

Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?" (arXiv 2305.12740). The edited "model"
is the unchanged model plus a context: k demonstrations retrieved from a pool of other edits by sentence-embedding
similarity, then the new fact itself, in the paper's format ("New Fact: <fact>\nPrompt: <prompt> <answer>").
Three kinds of demonstration teach three behaviours: copy (the prompt is the new fact itself), update (a paraphrase,
answered with the new fact) and retain (an unrelated neighbour prompt, answered with its OLD answer: the new fact
must not leak). The paper uses k=32 = 4 copy / 12 update / 16 retain; the default here is k=8 with the same
proportions, since every query re-reads the whole context. The context ends with "Prompt: ", so
`context + question` is exactly what the model reads; `ke.evaluate(..., context=result.context)` scores it with
the same metrics as weight edits. Several requests in one edit: their new facts are joined into one "New Fact:" line.
"""
import random
from dataclasses import dataclass

from . import checks
from .caches import Cache
from .checks import context_window
from .requests import EditError
from .tokens import join

KINDS = ("copy", "update", "retain")
PAPER_MIX = {"copy": 4, "update": 12, "retain": 16}  # the paper's 32 demonstrations
DEFAULT_K = 8  # 1 copy / 3 update / 4 retain: the paper's proportions in ~250 tokens (CPU-friendly)
DEFAULT_RESERVE = 128  # tokens kept free after the context for the question and the answer
CONTEXT_MARGIN = 0  # edit() needs only the request to fit: fit_to_window checks the rest against reserve_tokens
CHAT_SYSTEM = ("Complete the prompt. Use the new fact when the prompt is about it; otherwise answer from what "
               "you know.")
_POOLS = Cache("ike pools")  # (name, "records" | "embeddings"): loaded and embedded once per process


@dataclass(frozen=True)
class PoolRecord:
    """One edit in the demonstration pool: its new fact, a paraphrase, and a neighbour prompt with its old answer."""
    subject: str
    prompt: str            # the edit prompt with the subject filled in
    target_new: str
    paraphrase: str = None
    neighbour: str = None
    neighbour_answer: str = None

    @property
    def fact(self):
        """The new fact as one sentence: prompt + new answer."""
        return self.prompt + join(self.prompt, self.target_new)

    def supports(self, kind):
        """Can this record make a demonstration of `kind`?"""
        return kind == "copy" or (kind == "update" and bool(self.paraphrase)) or \
            (kind == "retain" and bool(self.neighbour) and bool(self.neighbour_answer))


def clean_prompt(prompt, subject):
    """Cut the random text CounterFact puts before its paraphrase prompts ('Le développement ... . X is in')."""
    start = prompt.find(subject)
    if start < 0:
        return prompt.split("\n")[-1].strip()
    newline, period = prompt.rfind("\n", 0, start), prompt.rfind(". ", 0, start)
    return prompt[max(newline + 1, period + 2 if period >= 0 else 0):].strip()


def record_from_case(case):
    """A PoolRecord from an EditCase (its first paraphrase and first locality probe)."""
    req = case.request
    loc = case.locality[0] if case.locality else None
    para = clean_prompt(case.paraphrase[0].prompt, req.subject) if case.paraphrase else None
    return PoolRecord(req.subject, req.prompt_text, req.target_new, para or None,
                      loc.prompt if loc else None, loc.answer if loc else None)


def format_demo(record, kind):
    """One demonstration in the paper's "New Fact: ... / Prompt: ..." format, ending with a blank line."""
    if kind == "copy":
        prompt = record.fact
    elif kind == "update":
        prompt = record.paraphrase + join(record.paraphrase, record.target_new)
    elif kind == "retain":
        prompt = record.neighbour + join(record.neighbour, record.neighbour_answer)
    else:
        raise EditError(f"mix: unknown demonstration kind {kind!r}; use {list(KINDS)}")
    return f"New Fact: {record.fact}\nPrompt: {prompt}\n\n"


def new_fact_line(requests):
    """'New Fact: ...' for the edit itself; several requests are joined into one line with '. '."""
    facts = [r.prompt_text + join(r.prompt_text, r.target_new) for r in requests]
    return "New Fact: " + ". ".join(facts)


def _check_mix(mix):
    if isinstance(mix, str):
        if mix != "paper":
            raise EditError(f"mix: unknown mix {mix!r}; use 'paper', a dict like {{'copy': 1, 'update': 3, "
                            "'retain': 4}} or a (copy, update, retain) tuple")
        return dict(PAPER_MIX)
    if isinstance(mix, (tuple, list)):
        if len(mix) != 3:
            raise EditError(f"mix: a tuple needs 3 weights (copy, update, retain), got {len(mix)}")
        mix = dict(zip(KINDS, mix))
    if not isinstance(mix, dict):
        raise EditError(f"mix: expected 'paper', a dict or a 3-tuple, got {type(mix).__name__}")
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise EditError(f"mix: unknown demonstration kind(s) {unknown}; use {list(KINDS)}")
    for kind, w in mix.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or w != w:
            raise EditError(f"mix: weight of {kind!r} must be a non-negative number, got {w!r}")
    if sum(mix.values()) <= 0:
        raise EditError("mix: all weights are zero; give at least one kind a positive weight (or use k=0)")
    return {kind: float(mix.get(kind, 0)) for kind in KINDS}


def demo_counts(k, mix="paper"):
    """How many demonstrations of each kind: k split by the mix proportions (largest remainder rounding)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise EditError(f"k: expected a non-negative integer number of demonstrations, got {k!r}")
    weights = _check_mix(mix)
    total = sum(weights.values())
    exact = {kind: k * w / total for kind, w in weights.items()}
    counts = {kind: int(v) for kind, v in exact.items()}
    for kind in sorted(KINDS, key=lambda c: (-(exact[c] - counts[c]), KINDS.index(c)))[:k - sum(counts.values())]:
        counts[kind] += 1
    return counts


def _check_pool(pool):
    """None, a named pool, or a non-empty list of EditCase/PoolRecord (items are checked when it is read)."""
    if pool is not None and not isinstance(pool, (str, list, tuple)):
        raise EditError(f"pool: expected None, 'counterfact', 'course', 'lecture' or a list of EditCase/PoolRecord, "
                        f"got {type(pool).__name__}")
    if isinstance(pool, str) and pool not in ("counterfact", "course", "lecture"):
        raise EditError(f"pool: unknown pool {pool!r}; use 'counterfact', 'course', 'lecture' or a list of EditCase")
    if isinstance(pool, (list, tuple)) and not pool:
        raise EditError("pool: empty list; pass some EditCase records, or None for the default pool")


@dataclass(frozen=True)
class Config:
    """IKE's options: how many demonstrations, of which kinds, from which pool, and how the context is framed."""
    k: int = DEFAULT_K                  # demonstrations retrieved (the paper: 32)
    mix: object = "paper"               # 'paper', {'copy': w, 'update': w, 'retain': w} or a (copy, update, retain)
    pool: object = None                 # None (CounterFact train, else the course facts), a name, or EditCases
    chat: bool = False                  # wrap the context in the tokenizer's chat template
    seed: int = 0                       # order in which demonstration kinds are assigned to neighbours
    reserve_tokens: int = DEFAULT_RESERVE

    def __post_init__(self):
        demo_counts(self.k, self.mix)
        checks.flag("chat", self.chat)
        checks.integer("seed", self.seed, hint="any integer; it fixes which neighbour gets which kind")
        checks.integer("reserve_tokens", self.reserve_tokens, 1, hint="tokens left for question + answer")
        _check_pool(self.pool)


def touched_parameters(model, requests, cfg):
    """IKE changes no weight."""
    return []


def _named_pool(name):
    """Records + embeddings of a named pool ('counterfact' / 'course': their train split; 'lecture'), cached."""
    from .data import load_cases
    from .retrieval import cached_embed
    records = _POOLS.get((name, "records"), lambda: [record_from_case(c) for c in load_cases(name, split="train")])
    emb = _POOLS.get((name, "embeddings"), lambda: cached_embed([r.fact for r in records]))
    return name, records, emb


def resolve_pool(pool=None):
    """(name, records, embeddings): CounterFact train when available, else the course facts; or a custom list."""
    if pool is None:
        try:
            return _named_pool("counterfact")
        except (FileNotFoundError, OSError):
            return _named_pool("course")
    if isinstance(pool, str):
        return _named_pool(pool)
    from .requests import EditCase
    records = []
    for i, item in enumerate(pool):
        if isinstance(item, EditCase):
            records.append(record_from_case(item))
        elif isinstance(item, PoolRecord):
            records.append(item)
        else:
            raise EditError(f"pool: item {i} is a {type(item).__name__}; pass EditCase or PoolRecord objects")
    from .retrieval import cached_embed
    return "custom", records, cached_embed([r.fact for r in records])


def select_demos(requests, records, embeddings, k=DEFAULT_K, mix="paper", seed=0):
    """Retrieve and label k demonstrations, nearest last (closest to the question), the edit's own record excluded.

    Returns [{"kind", "record", "similarity"}]. Kinds are assigned to the neighbours in a seeded random order
    (as in the paper), so every kind gets some close and some far neighbours.
    """
    from .retrieval import embed, nearest
    counts = demo_counts(k, mix)
    own_subjects = {r.subject.lower() for r in requests}
    own_prompts = {r.prompt_text.lower() for r in requests}
    allowed = [i for i, rec in enumerate(records)
               if rec.subject.lower() not in own_subjects and rec.prompt.lower() not in own_prompts]
    if not allowed or k == 0:
        return []
    query = embed([r.prompt_text + join(r.prompt_text, r.target_new) for r in requests])
    order, scores = nearest(query, embeddings[allowed], len(allowed))
    ranked = [(allowed[i], s) for i, s in zip(order, scores)]
    slots = [kind for kind in KINDS for _ in range(counts[kind])]
    random.Random(seed).shuffle(slots)
    used, demos = set(), []
    for kind in slots:
        pick = next(((i, s) for i, s in ranked if i not in used and records[i].supports(kind)), None)
        if pick is None:  # the pool has no (more) records able to make this kind of demonstration
            continue
        used.add(pick[0])
        demos.append({"kind": kind, "record": records[pick[0]], "similarity": round(float(pick[1]), 4)})
    return demos[::-1]


def build_context(tok, requests, demos, chat=False):
    """The exact text prepended to every question: demonstrations, the new fact, then 'Prompt: '."""
    body = "".join(format_demo(d["record"], d["kind"]) for d in demos) + new_fact_line(requests)
    if not chat:
        return body + "\nPrompt: "
    if not getattr(tok, "chat_template", None):
        raise EditError("chat: this tokenizer has no chat template; use chat=False (plain prompt) for base models")
    messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": body}]
    # The assistant's turn is pre-filled with "Prompt: ", so appending the question continues that turn.
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Prompt: "


def reference_context(tok, requests, records, cfg):
    """IKE's context the plain way (paper §3.2): embed, rank the pool by cosine similarity, label, format.

    No cache, no top-k, no window fitting: the yardstick `apply` is tested equal to when everything fits.
    """
    from .retrieval import embed
    facts = [r.prompt_text + join(r.prompt_text, r.target_new) for r in requests]
    query, keys = embed(facts), embed([rec.fact for rec in records])     # unit vectors: dot product = cosine
    own = {r.subject.lower() for r in requests} | {r.prompt_text.lower() for r in requests}
    ranked = []
    for i, rec in enumerate(records):
        if rec.subject.lower() in own or rec.prompt.lower() in own:
            continue                                                       # never the edit's own fact
        ranked.append((max(float(q @ keys[i]) for q in query), i))        # close to any of the new facts
    ranked.sort(key=lambda pair: -pair[0])
    counts = demo_counts(cfg.k, cfg.mix)
    slots = [kind for kind in KINDS for _ in range(counts[kind])]
    random.Random(cfg.seed).shuffle(slots)                                 # kinds in random order, as in the paper
    demos, used = [], set()
    for kind in slots:
        for _, i in ranked:
            if i not in used and records[i].supports(kind):
                used.add(i)
                demos.append({"kind": kind, "record": records[i]})
                break
    return build_context(tok, requests, demos[::-1], cfg.chat)            # nearest last, next to the question


def _drop_one(demos, counts):
    """Remove the least similar update/retain demo from the kind furthest above its share; copy demos go last."""
    left = {kind: sum(d["kind"] == kind for d in demos) for kind in KINDS}
    droppable = [kind for kind in ("update", "retain") if left[kind]] or [kind for kind in KINDS if left[kind]]
    kind = max(droppable, key=lambda c: (left[c] / max(counts[c], 1), c == "retain"))
    first = next(i for i, d in enumerate(demos) if d["kind"] == kind)  # demos are nearest-last: first = farthest
    return demos[:first] + demos[first + 1:]


def fit_to_window(model, tok, requests, demos, chat, reserve_tokens):
    """Drop demonstrations until context + reserve_tokens fits the context window; never cut the question."""
    window = context_window(model, tok)
    n_tokens = lambda ds: len(tok(build_context(tok, requests, ds, chat), add_special_tokens=False).input_ids)
    if window is None:
        return demos, None, n_tokens(demos)
    budget = window - reserve_tokens
    bare = n_tokens([])
    if bare > budget:
        raise EditError(f"reserve_tokens: the new fact alone takes {bare} tokens, and the context window "
                        f"(max_position_embeddings={window}) minus reserve_tokens={reserve_tokens} leaves {budget}; "
                        "shorten the request or lower reserve_tokens")
    counts = {kind: max(sum(d["kind"] == kind for d in demos), 1) for kind in KINDS}
    length = n_tokens(demos)
    while length > budget:
        demos = _drop_one(demos, counts)
        length = n_tokens(demos)
    return demos, budget, length


def apply(model, tok, requests, cfg):
    """Build the IKE context for `requests`: retrieve demonstrations, fit them to the window, format them."""
    k = cfg.k
    name, records, embeddings = resolve_pool(cfg.pool) if k > 0 else ("none", [], None)
    wanted = select_demos(requests, records, embeddings, k, cfg.mix, cfg.seed) if k > 0 else []
    demos, budget, length = fit_to_window(model, tok, requests, wanted, cfg.chat, cfg.reserve_tokens)
    context = build_context(tok, requests, demos, cfg.chat)
    info = {"pool": name, "pool_size": len(records), "k": k, "chat": cfg.chat,
            "counts": {kind: sum(d["kind"] == kind for d in demos) for kind in KINDS},
            "retrieved": len(wanted), "dropped": len(wanted) - len(demos), "context_tokens": length,
            "budget_tokens": budget,
            "demonstrations": [{"kind": d["kind"], "subject": d["record"].subject, "fact": d["record"].fact,
                                "similarity": d["similarity"]} for d in demos]}
    return {"context": context, "info": info}
