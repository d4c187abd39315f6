"""Causal tracing (因果跟踪, chapter 4): which hidden states carry a fact from the subject to the answer?

ROME (Meng et al. 2022, §2) runs the model three ways: clean (P(answer) = `high`); corrupted, with Gaussian noise
(std = `noise` x σ of the model's subject-token embeddings) on the subject tokens' embeddings (`low`); and
restored: corrupted, but one clean state copied back at one (token, layer). How much of P(answer) comes back
says how much that state matters. Kinds: "hidden" (a block's output), "mlp" and "attn" (a sublayer's output,
restored over a window of layers around `layer`).

`reference_trace` is the plain loop: one full forward per restored state. The fast path gives the same scores:
a restore at (t, l) cannot change positions < t (causal attention) nor anything before layer l, so it reuses the
corrupted run's keys/values and block outputs there and computes only what the restore can change.
`severed_effects` is ROME's severed experiment (Fig. 7): the same restore at the last subject token while the
MLP (or attention) outputs at the subject tokens stay corrupted.
"""
import contextlib
from dataclasses import dataclass, field

import torch

from . import checks
from .caches import Cache
from .adapters import (cache_tensors, device_of, embedding_matrix, get_adapter, get_module, kv_cache, module_name,
                       num_layers)
from .hooks import first_tensor, replace_first_tensor, override_forward, patch, record, set_at
from .requests import EditCase, EditError, EditRequest
from .tokens import join, subject_token_range

KINDS = ("hidden", "mlp", "attn")
SEVER = (None, "mlp", "attn")  # severed_effects: which sublayers stay corrupted at the subject tokens
_SIGMA = Cache("tracing sigma")  # per model: σ of its subject-token embeddings (computed once per model)


# ----------------------------------------------------------------------------------------------- setup


@torch.no_grad()
def embedding_std(model, tok, subjects=None):
    """σ: the std of the model's input embeddings over the tokens of many subjects (ROME §2; cached per model)."""
    if subjects is None:
        from .data import load_lecture
        lecture = lambda: sorted({c.request.subject for c in load_lecture()})
        return _SIGMA.get("lecture subjects", lambda: embedding_std(model, tok, lecture()), owner=model)
    ids = [i for s in subjects for i in tok(" " + s, add_special_tokens=False).input_ids]
    emb = embedding_matrix(model)[torch.tensor(ids, device=embedding_matrix(model).device)].float()
    return emb.std().item()


def _check(prompt, subject, kind, samples, window, noise, answer):
    """Validate the arguments of causal_trace; each error names the field and the fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise EditError("prompt: expected a non-empty string, e.g. 'The Space Needle is located in the city of'")
    checks.text("prompt", prompt, "'The Space Needle is located in the city of'")
    checks.text("subject", subject, "subject='The Space Needle' (the words of the prompt to corrupt)")
    if subject not in prompt:
        raise EditError(f"subject: {subject!r} does not occur in the prompt {prompt!r}; pass a subject that the "
                        "prompt contains verbatim")
    if kind not in KINDS:
        raise EditError(f"kind: expected one of {KINDS}, got {kind!r}")
    for name, value in (("samples", samples), ("window", window)):
        checks.integer(name, value, 1)
    checks.number("noise", noise, 0, open_low=True, desc="a positive multiple of σ (ROME uses 3.0)")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise EditError("answer: expected a non-empty string or None (None traces the model's own answer)")
    checks.text("answer", answer, required=False)


def _token_rows(tokens):
    """Token indices to trace: a list of integers (numpy integers and tensors too)."""
    tokens = tokens.tolist() if hasattr(tokens, "tolist") else tokens
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise EditError(f"tokens: expected a list of token indices or None, got {tokens!r}")
    return [checks.integer("tokens", t, hint="pass token positions such as [0, 3], or None for all") for t in tokens]


def window_layers(layer, window, n_layers):
    """Layers restored together for an mlp/attn trace at `layer`: ROME's window centred on it, clipped."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _sites(model, kind):
    """Module name per layer whose output a restore overwrites: block output, MLP output or attention output."""
    name = {"hidden": "layer", "mlp": "mlp", "attn": "attn"}[kind]
    return [module_name(model, name, layer) for layer in range(num_layers(model))]


@dataclass
class Setup:
    """Everything the clean and corrupted runs give, shared by the reference and the fast trace."""
    ids: torch.Tensor        # (1, T) prompt token ids
    subject_range: tuple     # (first, last+1)
    answer_id: int
    embeds: torch.Tensor     # (1, T, d) clean input embeddings
    noisy: torch.Tensor      # (S, T, d) corrupted input embeddings
    high: float
    low: float
    clean: dict = field(default_factory=dict)      # module name -> (1, T, d) clean output
    corrupt: dict = field(default_factory=dict)    # module name -> (S, T, d) corrupted output (blocks, MLPs, attn)
    cache: list = field(default_factory=list)      # per layer (keys, values) of the corrupted run
    templates: dict = field(default_factory=dict)  # block name -> that block's output structure


def _prob(logits, answer_id):
    """Mean over rows of P(answer) at the last position (float32 softmax)."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id].mean().item()


@torch.no_grad()
def prepare(model, tok, prompt, subject, samples=10, noise=3.0, seed=0, answer=None, need_cache=True):
    """The clean run (recording every state) and the corrupted run (noisy subject embeddings, keys/values kept)."""
    device = device_of(model)
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids], device=device)
    first, end = subject_token_range(tok, prompt, subject)
    embeds = get_module(model, module_name(model, "embed"))(ids)
    names = {k: _sites(model, k) for k in KINDS}
    with record(model, names["hidden"] + names["mlp"] + names["attn"]) as clean:
        logits = model(inputs_embeds=embeds).logits
    if answer is None:
        answer_id = int(logits[0, -1].argmax())
    else:
        answer_id = tok(join(prompt, answer), add_special_tokens=False).input_ids[0]
    high = _prob(logits, answer_id)
    gen = torch.Generator().manual_seed(seed)
    sigma = embedding_std(model, tok)
    delta = torch.randn(samples, end - first, embeds.shape[-1], generator=gen) * (noise * sigma)
    noisy = embeds.repeat(samples, 1, 1)
    noisy[:, first:end] += delta.to(device=device, dtype=noisy.dtype)
    # the blocks' whole outputs (tuples in some versions) are the templates the fast path fills with its rows
    with record(model, names["hidden"] + names["mlp"] + names["attn"]) as corrupt, \
            record(model, names["hidden"], whole=True) as templates:
        out = model(inputs_embeds=noisy, use_cache=need_cache)
    cache = cache_tensors(out.past_key_values) if need_cache else []
    return Setup(ids, (first, end), answer_id, embeds, noisy, high, _prob(out.logits, answer_id), dict(clean),
                 dict(corrupt), cache, dict(templates))


# ------------------------------------------------------------------------------------ reference loop

@torch.no_grad()
def _restore_full(model, s, kind, t, layer, window):
    """P(answer) for one restored state, the plain way: a whole forward of the noisy copies with one patch."""
    names = _sites(model, kind)
    layers = [layer] if kind == "hidden" else window_layers(layer, window, len(names))
    with contextlib.ExitStack() as stack:
        for j in layers:   # restore: the clean run's state h_i^(l) at token t (ROME §2, "corrupted-with-restoration")
            stack.enter_context(set_at(model, names[j], t, s.clean[names[j]][0, t]))
        return _prob(model(inputs_embeds=s.noisy).logits, s.answer_id)


def reference_trace(model, tok, prompt, subject, kind="hidden", samples=10, window=10, noise=3.0, seed=0,
                    answer=None, tokens=None):
    """The plain loop: one full forward of all noisy copies per (token, layer). Slow; the fast path's yardstick."""
    _check(prompt, subject, kind, samples, window, noise, answer)
    # clean run: P(answer) = high; corrupted run: subject embeddings + ε, ε ~ N(0, (noise σ)²), P(answer) = low
    s = prepare(model, tok, prompt, subject, samples, noise, seed, answer, need_cache=False)
    n_tokens, n_layers = s.ids.shape[1], num_layers(model)
    scores = torch.full((n_tokens, n_layers), float("nan"))
    for t in range(n_tokens) if tokens is None else tokens:
        scores[t] = torch.tensor([_restore_full(model, s, kind, t, layer, window) for layer in range(n_layers)])
    return _result(tok, prompt, subject, kind, samples, window, noise, s, scores)   # effect = scores - low


# ------------------------------------------------------------------------------------------ fast path

def _prefix_cache(model, s, t, repeats):
    """A fresh cache with the corrupted run's keys/values for positions < t, layer j repeated `repeats[j]` times."""
    if t == 0:
        return None
    # A layer no row reaches still needs a non-empty entry: the mask reads the prefix length from the cache.
    return kv_cache(model, [(k[..., :t, :].repeat(max(n, 1), 1, 1, 1), v[..., :t, :].repeat(max(n, 1), 1, 1, 1))
                            for (k, v), n in zip(s.cache, repeats)])


def _rows(x, n, batch):
    """Keep the first n rows of batch-sized tensors inside a block's arguments (masks, ids); leave the rest."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == batch:
        return x[:n]
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(item, n, batch) for item in x)
    return x


@contextlib.contextmanager
def _growing_blocks(model, s, starts, n_active):
    """Block j computes only its first n_active[j] rows; the others pass on `starts` (their input when they join).

    Rows are sorted by the block where their restore begins, so the rows active at block j are a prefix, and
    everything before a row's start is the corrupted run's, which is not recomputed. The rows travel in one
    buffer that each block overwrites in place for its active rows (no per-block concatenation).
    """
    blocks = get_module(model, get_adapter(model).layers)
    names = _sites(model, "hidden")
    batch, buffer = starts.shape[0], starts.clone()

    def wrap(j, original, template):
        def forward(*args, **kwargs):
            n = n_active[j]
            if n == 0:
                return replace_first_tensor(template, buffer)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            args = (hidden[:n],) + tuple(_rows(a, n, batch) for a in args[1:])
            out = original(*args, **{k: _rows(v, n, batch) for k, v in kwargs.items()})
            if n == batch:
                return out
            buffer[:n] = first_tensor(out)
            return replace_first_tensor(out, buffer)
        return forward
    with override_forward([(block, lambda original, j=j: wrap(j, original, s.templates[names[j]]))
                           for j, block in enumerate(blocks)]):
        yield


def _freeze(values, samples):
    """Patch function: the first positions of each row get `values` (S, k, d), the corrupted run's, row by sample."""
    def fn(x):
        if values.shape[1] == 0:  # the subject lies entirely before the computed positions
            return x
        x = x.clone()
        x[:, :values.shape[1]] = values.repeat(x.shape[0] // samples, 1, 1).to(x.dtype)
        return x
    return fn


@contextlib.contextmanager
def _last_position_only(mlp):
    """The last block's MLP computes the last position only: the head reads nothing else, and an MLP is per position.

    (The other positions get zeros; nothing downstream reads them.)
    """
    def make(original):
        def forward(hidden, *args, **kwargs):
            out = torch.zeros_like(hidden)
            out[:, -1:] = original(hidden[:, -1:].contiguous(), *args, **kwargs)  # strided: one slow product per row
            return out
        return forward
    with override_forward([(mlp, make)]):
        yield


@torch.no_grad()
def _restore_token(model, s, kind, t, layers, window, frozen=()):
    """P(answer) for restores at token t and each layer in `layers`, in ONE forward of len(layers) x S rows.

    Only positions >= t are computed (positions < t come from the corrupted run's cached keys/values), and
    each layer's rows join at the block where their restore begins. Modules named in `frozen` keep their
    corrupted-run outputs at the subject tokens (the severed experiment).
    """
    n_layers, samples = num_layers(model), s.noisy.shape[0]
    blocks, names = _sites(model, "hidden"), _sites(model, kind)
    starts, joins, windows = [], [], []
    for layer in layers:
        if kind == "hidden":  # block `layer`'s output is known: corrupted, with the clean state at t
            start = s.corrupt[blocks[layer]][:, t:].clone()
            start[:, 0] = s.clean[blocks[layer]][0, t]
            joins.append(layer + 1)
            windows.append([])
        else:
            window_ = window_layers(layer, window, n_layers)
            start = s.corrupt[blocks[window_[0] - 1]][:, t:] if window_[0] > 0 else s.noisy[:, t:]
            joins.append(window_[0])
            windows.append(window_)
        starts.append(start)
    starts = torch.cat(starts)
    groups_active = [sum(join <= j for join in joins) for j in range(n_layers)]
    n_active = [g * samples for g in groups_active]
    with contextlib.ExitStack() as stack:
        for j in sorted({j for w in windows for j in w}):
            rows = torch.tensor([j in w for w in windows], device=starts.device).repeat_interleave(samples)
            value = s.clean[names[j]][0, t]

            def fn(x, rows=rows, value=value):
                x = x.clone()
                x[rows[:x.shape[0]], 0] = value.to(x.dtype)
                return x
            stack.enter_context(patch(model, names[j], fn))
        for name in frozen:
            stack.enter_context(patch(model, name, _freeze(s.corrupt[name][:, t:s.subject_range[1]], samples)))
        stack.enter_context(_growing_blocks(model, s, starts, n_active))
        stack.enter_context(_last_position_only(get_module(model, module_name(model, "mlp", n_layers - 1))))
        # The head reads the last position only; a contiguous copy keeps it one matrix product (a strided
        # slice makes torch fall back to one matrix-vector product per row, ten times slower).
        stack.enter_context(patch(model, module_name(model, "lm_head"), torch.Tensor.contiguous, what="input"))
        # Rows joining at block 0 read the noisy embeddings, which are their `starts`; the others ignore theirs.
        out = model(inputs_embeds=starts, use_cache=True, logits_to_keep=1,
                    past_key_values=_prefix_cache(model, s, t, groups_active))
    probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, s.answer_id].exp()
    return probs.view(len(layers), samples).mean(1).cpu()


def _fast_grid(model, s, kind, window, tokens, max_rows=512, frozen=()):
    """Scores for the token rows in `tokens` (others NaN); rows before the subject equal `low` exactly."""
    n_tokens, n_layers = s.ids.shape[1], num_layers(model)
    scores = torch.full((n_tokens, n_layers), float("nan"))
    per_forward = max(1, max_rows // s.noisy.shape[0])
    for t in tokens:
        if t < s.subject_range[0]:  # before the subject the clean and corrupted runs agree: nothing to restore
            scores[t] = s.low
            continue
        todo = list(range(n_layers))
        if kind == "hidden" and t < n_tokens - 1:  # the last block's output at t never reaches the last position
            scores[t, -1] = s.low
            todo = todo[:-1]
        for first in range(0, len(todo), per_forward):
            layers = todo[first:first + per_forward]
            scores[t, layers] = _restore_token(model, s, kind, t, layers, window, frozen)
    return scores


# --------------------------------------------------------------------------------------------- result

@dataclass
class TraceResult:
    """A causal trace: `scores[t, l]` = P(answer) with state (t, l) restored; `low`/`high` = corrupted/clean."""
    prompt: str
    subject: str
    kind: str
    scores: torch.Tensor
    low: float
    high: float
    answer: str
    answer_id: int
    tokens: list
    subject_range: tuple
    samples: int
    window: int
    noise: float

    @property
    def effects(self):
        """Indirect effects: scores - low (how much of P(answer) a restore brings back)."""
        return self.scores - self.low

    def plot(self, ax=None):
        """Heatmap tokens x layers as in ROME Fig. 1; subject tokens marked with *."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.32 * len(self.tokens) + 1.4))
        cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[self.kind]
        image = ax.imshow(self.scores.numpy(), cmap=cmap, vmin=self.low, aspect="auto", interpolation="nearest")
        first, end = self.subject_range
        labels = [repr(w)[1:-1] + ("*" if first <= i < end else "") for i, w in enumerate(self.tokens)]
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer" if self.kind == "hidden" else f"centre of {self.window} restored {self.kind} layers")
        what = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}[self.kind]
        ax.set_title(f"restoring one {what}: P({self.answer.strip()!r}), low {self.low:.3f}, high {self.high:.3f}",
                     fontsize=9)
        ax.grid(False)
        ax.figure.colorbar(image, ax=ax, fraction=0.04)
        return ax


def _result(tok, prompt, subject, kind, samples, window, noise, s, scores):
    tokens = [tok.decode([i]) for i in s.ids[0].tolist()]
    return TraceResult(prompt, subject, kind, scores, s.low, s.high, tok.decode([s.answer_id]), s.answer_id, tokens,
                       s.subject_range, samples, window, noise)


def causal_trace(model, tok, prompt, subject, kind="hidden", samples=10, window=10, noise=3.0, seed=0, answer=None,
                 tokens=None):
    """Trace which (token, layer) states carry `subject`'s fact to the answer (chapter 4); returns a TraceResult.

    `answer=None` traces the model's own greedy next token; `tokens` restricts the rows computed (others NaN).
    """
    _check(prompt, subject, kind, samples, window, noise, answer)
    rows = None if tokens is None else _token_rows(tokens)
    s = prepare(model, tok, prompt, subject, samples, noise, seed, answer)
    rows = range(s.ids.shape[1]) if rows is None else rows
    if any(not 0 <= t < s.ids.shape[1] for t in rows):
        raise EditError(f"tokens: indices must lie in [0, {s.ids.shape[1] - 1}] for this prompt, got {list(rows)}")
    return _result(tok, prompt, subject, kind, samples, window, noise, s, _fast_grid(model, s, kind, window, rows))


# ---------------------------------------------------------------------------- averages over many facts

def _as_fact(item):
    """A fact to trace as dict(prompt, subject, answer) from an EditRequest, EditCase, dict or tuple."""
    if isinstance(item, EditCase):
        item = item.request
    if isinstance(item, EditRequest):
        return {"prompt": item.prompt_text, "subject": item.subject, "answer": item.target_true}
    if isinstance(item, dict) and "prompt" in item and "subject" in item:
        return {"prompt": item["prompt"].replace("{}", item["subject"]), "subject": item["subject"],
                "answer": item.get("answer")}
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return {"prompt": item[0], "subject": item[1], "answer": item[2] if len(item) == 3 else None}
    raise EditError(f"facts: cannot read {item!r}; pass EditRequests, EditCases, dicts with prompt and subject, "
                    "or (prompt, subject[, answer]) tuples")


@torch.no_grad()
def known_facts(model, tok, sources=("lecture", "course"), n=None, counterfact_n=600, batch_size=32):
    """Facts the model knows: its greedy next token is the first token of the stated true answer (chapter 4)."""
    from .data import load_counterfact, load_course_facts, load_lecture
    candidates, seen = [], set()
    items = []
    if "lecture" in sources:
        items += load_lecture()
    if "course" in sources:
        items += load_course_facts("val") + load_course_facts("train")
    if "counterfact" in sources:
        try:
            items += load_counterfact("val", n=counterfact_n, seed=0)
        except FileNotFoundError:
            pass  # offline without a data directory: the lecture cases alone
    for item in items:
        fact = _as_fact(item)
        key = (fact["prompt"], fact["subject"])
        if fact["answer"] and fact["subject"] in fact["prompt"] and key not in seen:
            seen.add(key)
            candidates.append(fact)
    known, old_side = [], tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(candidates), batch_size):
            if n is not None and len(known) >= n:  # enough: later candidates cannot change the first n
                break
            chunk = candidates[i:i + batch_size]
            batch = tok([f["prompt"] for f in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device_of(model)) for k, v in batch.items()}
            greedy = model(**batch).logits[:, -1].argmax(-1).tolist()
            for fact, g in zip(chunk, greedy):
                first = tok(join(fact["prompt"], fact["answer"]), add_special_tokens=False).input_ids[0]
                if g == first and tok.decode([first]).strip():
                    known.append(fact)
    finally:
        tok.padding_side = old_side
    return known[:n] if n is not None else known


def average_effects(model, tok, facts, kind="mlp", position="last_subject", samples=10, window=10, noise=3.0,
                    seed=0, progress=False):
    """Indirect effect by layer at one token per fact, averaged over facts (ROME Fig. 2/3): (mean curve, per fact).

    `position` is "last_subject" (the early site) or "last" (the prompt's last token, the late site).
    """
    from tqdm.auto import tqdm
    if position not in ("last_subject", "last"):
        raise EditError(f"position: expected 'last_subject' or 'last', got {position!r}")
    facts = [_as_fact(f) for f in facts]
    if not facts:
        raise EditError("facts: empty; pass at least one fact (see known_facts)")
    rows = []
    for fact in tqdm(facts, desc=f"tracing {kind}", disable=not progress):
        _check(fact["prompt"], fact["subject"], kind, samples, window, noise, fact["answer"])
        s = prepare(model, tok, fact["prompt"], fact["subject"], samples, noise, seed, fact["answer"])
        t = s.subject_range[1] - 1 if position == "last_subject" else s.ids.shape[1] - 1
        rows.append(_fast_grid(model, s, kind, window, [t])[t] - s.low)
    per_fact = torch.stack(rows)
    return per_fact.mean(0), per_fact


@torch.no_grad()
def severed_effects(model, tok, prompt, subject, sever="mlp", samples=10, noise=3.0, seed=0, answer=None):
    """Indirect effect by layer at the last subject token with the MLPs or attention severed (chapter 4; ROME Fig. 7).

    Restores the clean hidden state at (last subject token, layer l) while every MLP (`sever="mlp"`) or attention
    (`sever="attn"`) output at the subject tokens keeps its corrupted-run value, so the sublayers after l cannot
    help; `sever=None` is the plain hidden-state row. Returns a tensor (n_layers,) of scores - low.
    """
    if sever not in SEVER:
        raise EditError(f"sever: expected None, 'mlp' or 'attn' (the sublayers kept corrupted), got {sever!r}")
    _check(prompt, subject, "hidden", samples, 1, noise, answer)
    s = prepare(model, tok, prompt, subject, samples, noise, seed, answer)
    t = s.subject_range[1] - 1
    frozen = () if sever is None else _sites(model, sever)
    return _fast_grid(model, s, "hidden", 1, [t], frozen=frozen)[t] - s.low


@dataclass
class LayerSuggestion:
    """suggest_layer's answer: the layer, the (smoothed) average MLP indirect-effect curve, and the raw curve."""
    layer: int
    curve: torch.Tensor
    raw: torch.Tensor
    n_facts: int

    def __iter__(self):  # `layer, curve = ke.suggest_layer(...)`
        return iter((self.layer, self.curve))


def suggest_layer(model, tok, facts=None, n_facts=50, samples=5, window=10, noise=3.0, seed=0, smooth=3,
                  progress=False):
    """Propose ROME's edit layer: argmax of the average MLP indirect effect at the last subject token (chapter 4).

    For a model family without a published setting. `smooth` = width of a moving average over layers.
    Causal tracing's peak is a hint, not a guarantee that editing there works best (Hase et al. 2023).
    """
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise EditError(f"smooth: expected a positive integer window (1 = no smoothing), got {smooth!r}")
    if facts is None:
        facts = known_facts(model, tok, n=n_facts)
    raw, per_fact = average_effects(model, tok, facts, "mlp", "last_subject", samples, window, noise, seed, progress)
    kernel = torch.ones(1, 1, smooth) / smooth
    padded = torch.nn.functional.pad(raw[None, None], (smooth // 2, (smooth - 1) // 2), mode="replicate")
    curve = torch.nn.functional.conv1d(padded, kernel)[0, 0]
    return LayerSuggestion(int(curve.argmax()), curve, raw, len(per_fact))


# ------------------------------------------------------------------------------------------ explorer

def explore(model, tok, prompt, subject, kind="hidden", samples=5, answer=None):
    """The explorer's logic, free of widgets: (TraceResult, matplotlib figure) or (None, error message)."""
    import matplotlib.pyplot as plt
    try:
        result = causal_trace(model, tok, prompt, subject, kind=kind, samples=samples, answer=answer or None)
    except EditError as err:
        return None, str(err)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(result.tokens) + 1.4))
    result.plot(ax=ax)
    fig.tight_layout()
    return result, fig


def explorer(model, tok, prompt="The Space Needle is located in the city of", subject="The Space Needle"):
    """Interactive explorer (chapter 4): type a prompt and a subject, pick the kind, see the heatmap."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    prompt_box = w.Text(value=prompt, description="prompt", layout=w.Layout(width="95%"))
    subject_box = w.Text(value=subject, description="subject")
    answer_box = w.Text(value="", description="answer", placeholder="(model's own)")
    kind_box = w.Dropdown(options=list(KINDS), value="hidden", description="kind")
    samples_box = w.IntSlider(value=5, min=1, max=20, description="samples")
    button = w.Button(description="Trace", button_style="primary")
    out = w.Output()

    def run(_=None):
        out.clear_output(wait=True)
        with out:
            result, fig = explore(model, tok, prompt_box.value, subject_box.value, kind_box.value, samples_box.value,
                                  answer_box.value)
            if result is None:
                print(fig)
            else:
                plt.show(fig)
    button.on_click(run)
    return w.VBox([prompt_box, w.HBox([subject_box, answer_box]), w.HBox([kind_box, samples_box, button]), out])
