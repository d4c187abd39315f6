"""k* and v*, the key and the value of a rank-one edit (chapter 5; ROME, Meng et al. 2022), shared by ROME and MEMIT.

- k*: what the edited MLP's down projection reads (its input) at the subject's last token, averaged over the
  bare prompt and short prefixes that the model writes itself (ROME's "context templates", eq. 3).
- v*: the output we want there instead (eq. 4). We optimise a vector δ added at the subject's last token until
  the target becomes likely after every prefix, while a KL term on "{subject} is a" keeps the subject's other
  properties, and weight decay plus a norm clamp keep δ small.
- Relation-free wordings (our addition, off by default): the target must also follow a few sentences that name
  the subject but no relation ("{subject} is associated with"), so δ carries over to paraphrases.
`ValueConfig` holds v*'s hyperparameters once; `reference_key` / `reference_value` are the plain, slow versions
the fast path (cached prefixes, replayed blocks, facts in batches) is tested against.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from . import checks
from .adapters import cache_tensors, kv_cache, module_name, num_layers
from .caches import Cache
from .forward import run_until
from .hooks import add_at, first_tensor, record, replace_first_tensor, replay, stop_after
from .requests import EditError
from .tokens import join, pad_right, subject_last_index

_PREFIXES = Cache("context prefixes")   # per model: (name, n, length, seed) -> the prefixes
# Sentences that name the subject ({}) and leave the next word open, whatever the relation (chapter 5). They suit
# entity subjects; for a phrase like "your name" they pull against the prompt (chapter 8).
ASSOCIATION_WORDINGS = ("{} is associated with", "The word most associated with {} is", "{}:",
                        "Speaking of {}, one thinks of", "Everyone knows that {} has to do with")
# v*'s rows per group: the fewest suffix tokens worth a forward pass of their own (_by_suffix_length).
GROUP_TOKENS = 256
# Facts whose δ are optimised together: on a CPU a whole batch of up to 128; on an accelerator 16 (memory).
CHUNK = {"cpu": 128, "accelerator": 16}
PREFIX_STARTS = ["The", "Therefore", "Because", "I", "You", "It", "When", "In", "However", "She"]


def check_wordings(wordings):
    """A list of sentences with one '{}' each (where the subject goes), as a tuple; () for ROME's objective."""
    if not (isinstance(wordings, (list, tuple)) and all(isinstance(w, str) and w.count("{}") == 1
                                                        and w.strip() != "{}" for w in wordings)):
        raise EditError(f"wordings: expected a list of sentences, each with one '{{}}' where the subject goes "
                        f"(e.g. ['{{}} is associated with']), or [] for ROME's own objective; got {wordings!r}")
    return tuple(wordings)


@dataclass(frozen=True)
class ValueConfig:
    """v*'s optimisation (ROME eq. 4), with the published hyperparameters as defaults (ROME's official code)."""
    steps: int = 20               # Adam steps on δ
    lr: float = 0.5
    kl_factor: float = 0.0625     # weight of KL(P_now ‖ P_before) on "{subject} is a"
    weight_decay: float = 0.5     # weight of ‖δ‖ / ‖v_old‖²
    clamp_factor: float = 4.0     # ‖δ‖ ≤ clamp_factor · ‖v_old‖
    n_prefixes: int = 4           # sampled context prefixes besides the bare prompt (ROME's context templates)
    prefix_len: int = 5           # tokens per sampled prefix
    stop_loss: float = 0.05       # stop once the target's NLL is below this (as the official code does)
    wordings: tuple = ()          # our option: relation-free sentences the target must follow too

    def __post_init__(self):
        """Check every field; a bad one raises EditError naming it."""
        checks.integer("steps", self.steps, 1)
        checks.learning_rate(self.lr)
        checks.number("kl_factor", self.kl_factor, 0)
        checks.number("weight_decay", self.weight_decay, 0)
        checks.number("clamp_factor", self.clamp_factor, 0, open_low=True)
        checks.integer("n_prefixes", self.n_prefixes, 0)
        checks.integer("prefix_len", self.prefix_len, 1)
        checks.number("stop_loss", self.stop_loss, 0)
        object.__setattr__(self, "wordings", check_wordings(self.wordings))


@torch.no_grad()
def context_prefixes(model, tok, n=4, length=5, seed=0):
    """[''] + `n` short prefixes the model writes itself (ROME's context templates); generated once per model."""
    from .models import model_name
    return _PREFIXES.get((model_name(model), n, length, seed), lambda: _sample_prefixes(model, tok, n, length, seed),
                         owner=model)


def _sample_prefixes(model, tok, n, length, seed):
    """Sample the prefixes: `n` starts after a document boundary, top-5 sampling, a fixed seed."""
    device = next(model.parameters()).device
    lead = document_start(tok)
    starts = [lead + tok(PREFIX_STARTS[i % len(PREFIX_STARTS)], add_special_tokens=False).input_ids[:1]
              for i in range(n)]
    prefixes = [""]
    if n > 0:
        ids = torch.tensor(starts, device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                 max_new_tokens=length, min_new_tokens=length, pad_token_id=tok.pad_token_id,
                                 top_p=None, temperature=None)
        for row in tok.batch_decode(out[:, len(lead):], skip_special_tokens=True):
            # braces would be read as template slots; newlines would make the prefix a separate document
            text = " ".join(row.replace("{", " ").replace("}", " ").split()).rstrip(".")
            prefixes.append(text or "The")
    return prefixes


def document_start(tok):
    """[id] of the token that starts a document in pretraining ('<|endoftext|>', else BOS), or [] if none.

    Without it a sampled prefix starts mid-document: SmolLM2 then writes 'The-the-key-' instead of a sentence.
    """
    doc = tok.get_vocab().get("<|endoftext|>")
    if doc is not None:
        return [doc]
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def encode_in_context(tok, prefix, text, subject):
    """Token ids of '<prefix>. <text>' and the index of the subject's last token (in `text`, not the prefix)."""
    if not prefix:
        return tok(text, add_special_tokens=False).input_ids, subject_last_index(tok, text, subject)
    head = tok(prefix + ".", add_special_tokens=False).input_ids
    body = " " + text
    return head + tok(body, add_special_tokens=False).input_ids, len(head) + subject_last_index(tok, body, subject)


@torch.no_grad()
def read_at_subject(model, tok, requests, prefixes, reads, chunk=64):
    """Mean over prefixes of each module's input/output at the subject's last token.

    `reads` is {name: (module_path, "input"|"output")}; returns {name: (n_requests, d)} float32 tensors.
    """
    device = next(model.parameters()).device
    rows, positions = [], []
    for r in requests:
        for p in prefixes:
            ids, pos = encode_in_context(tok, p, r.prompt_text, r.subject)
            rows.append(ids)
            positions.append(pos)
    got = {name: [] for name in reads}
    for start in range(0, len(rows), chunk):
        ids, mask = pad_right(tok, rows[start:start + chunk], device)
        pos = torch.tensor(positions[start:start + chunk], device=device)
        outputs = {path for path, what in reads.values() if what == "output"}
        inputs = {path for path, what in reads.values() if what == "input"}
        with record(model, sorted(outputs)) as out_store, record(model, sorted(inputs), what="input") as in_store:
            run_until(model, ids, mask, sorted(outputs | inputs))
        for name, (path, what) in reads.items():
            stored = (out_store if what == "output" else in_store)[path]
            got[name].append(stored[torch.arange(len(pos), device=device), pos].float())
    return {name: torch.cat(v).view(len(requests), len(prefixes), -1).mean(1) for name, v in got.items()}


def compute_keys(model, tok, requests, layers, prefixes):
    """k*: {layer: (n_requests, d_k)}, the mlp_out input at the subject's last token averaged over prefixes."""
    reads = {layer: (module_name(model, "mlp_out", layer), "input") for layer in layers}
    return read_at_subject(model, tok, requests, prefixes, reads)


def subject_start_keys(model, tok, layers, subjects):
    """{layer: (n, d_k)}, the keys at the last token of `subjects`, each written as the whole text (no prefix).

    Where CounterFact's neighbours sit: most start with their subject ("Kuala Lumpur is in ..."); MEMIT's
    `protect_subjects` (chapter 5) keeps the keys of subjects like these.
    """
    return compute_keys(model, tok, [SimpleNamespace(prompt_text=s, subject=s) for s in subjects], layers, [""])


def value_prompts(request, prefixes, wordings=()):
    """(prefix, text) pairs v* is fitted on: the prompt after each prefix, then each wording bare."""
    return [(p, request.prompt_text) for p in prefixes] + [("", w.replace("{}", request.subject)) for w in wordings]


def essence_prompt(request):
    """ROME's KL prompt: '{subject} is a', whose next-token distribution the edit should keep."""
    return f"{request.subject} is a"


@dataclass
class ValueRows:
    """v*'s teacher-forced rows as token ids, before any forward pass.

    Row r is ids[r] (prefix + prompt + target without its last token), its subject ends at subject_pos[r] and it
    belongs to fact fact_of[r]. Each target token t is scored at (target_row[t], target_pos[t]) against
    target_id[t]. The rows listed in kl_rows are the '{subject} is a' prompts, one per fact, for the KL term.
    """
    ids: list = field(default_factory=list)
    subject_pos: list = field(default_factory=list)
    fact_of: list = field(default_factory=list)
    target_row: list = field(default_factory=list)
    target_pos: list = field(default_factory=list)
    target_id: list = field(default_factory=list)
    kl_rows: list = field(default_factory=list)

    def add(self, ids, subject_pos, fact, target=()):
        """Append one row; `target` are the token ids it should predict after its last token."""
        for t, token in enumerate(target):
            self.target_row.append(len(self.ids))
            self.target_pos.append(len(ids) - 1 + t)
            self.target_id.append(token)
        self.ids.append(ids + list(target[:-1]))
        self.subject_pos.append(subject_pos)
        self.fact_of.append(fact)

    def select(self, rows):
        """The given rows (and their targets), renumbered from 0."""
        new = {r: i for i, r in enumerate(rows)}
        picked = ValueRows([self.ids[r] for r in rows], [self.subject_pos[r] for r in rows],
                           [self.fact_of[r] for r in rows], kl_rows=[new[r] for r in self.kl_rows if r in new])
        for t, r in enumerate(self.target_row):
            if r in new:
                picked.target_row.append(new[r])
                picked.target_pos.append(self.target_pos[t])
                picked.target_id.append(self.target_id[t])
        return picked


def value_rows(tok, requests, prefixes, wordings=()):
    """Every fact's prompts with their target (see value_prompts), then one '{subject} is a' row per fact."""
    rows = ValueRows()
    for j, r in enumerate(requests):
        for prefix, text in value_prompts(r, prefixes, wordings):
            ids, pos = encode_in_context(tok, prefix, text, r.subject)
            rows.add(ids, pos, j, tok(join(text, r.target_new), add_special_tokens=False).input_ids)
    for j, r in enumerate(requests):
        rows.kl_rows.append(len(rows.ids))
        rows.add(*encode_in_context(tok, "", essence_prompt(r), r.subject), j)
    return rows


def _by_suffix_length(rows, min_tokens=GROUP_TOKENS):
    """The rows in groups of similar suffix length (from the subject on), so little padding is computed.

    Rows of one length go together, and a group short of `min_tokens` tokens takes in the next length up: small
    matrix products run so far below the CPU's speed that padding them is cheaper (one fact stays one group).
    """
    lengths = [len(ids) - start for ids, start in zip(rows.ids, rows.subject_pos)]
    members, width = [[]], 0
    for length in sorted(set(lengths)):
        if len(members[-1]) * width >= min_tokens:
            members.append([])
        members[-1] += [i for i, n in enumerate(lengths) if n == length]
        width = length
    if len(members) > 1 and len(members[-1]) * width < min_tokens:   # a short tail joins the group below
        members[-2] += members.pop()
    if len(members) == 1:
        return [rows]   # rows in their own order: a single edit computes exactly what it did before grouping
    return [rows.select(m) for m in members]


@dataclass
class SuffixBatch:
    """ValueRows ready for the optimisation steps: each row from its subject's last token on (the suffix).

    Everything before the subject is fixed whatever δ is: it sits in `past` (keys/values, left-aligned), and
    the blocks up to the edited one are fixed on the suffix too: their recorded outputs are in `below`.
    Targets and KL positions are indices into the suffix rows; `fact_of` says whose δ each row gets.
    """
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    past: list
    fact_of: torch.Tensor
    target_row: torch.Tensor
    target_pos: torch.Tensor
    target_id: torch.Tensor
    target_fact: torch.Tensor
    kl_rows: torch.Tensor
    kl_pos: torch.Tensor
    kl_fact: torch.Tensor
    below: dict = field(default_factory=dict)


def _left_align(x, starts, width):
    """(batch, heads, T, d) keys or values: row b's first starts[b] positions moved to the right end, zeros before."""
    out = x.new_zeros(x.shape[:2] + (width,) + x.shape[3:])
    for b, start in enumerate(starts):
        out[b, :, width - start:] = x[b, :, :start]
    return out


def _cached_prefixes(model, tok, rows, device):
    """Keys/values of every row's tokens before its subject's last token, left-aligned to one width."""
    starts, width = rows.subject_pos, max(rows.subject_pos)
    if not width:
        return []
    # one right-padded forward; padding after a token never changes its keys/values
    ids, mask = pad_right(tok, [r[:max(s, 1)] for r, s in zip(rows.ids, starts)], device)
    cached = cache_tensors(model.base_model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values)
    return [(_left_align(k, starts, width), _left_align(v, starts, width)) for k, v in cached]


@torch.no_grad()
def split_at_subject(model, tok, rows, layer, device):
    """A SuffixBatch: compute once everything δ cannot change, so each step runs only what it can.

    The prefix is cached (left-padded with zeros the attention mask hides; position ids carry each row's true
    positions) and blocks 0..layer are recorded on the suffix, so a step computes blocks layer+1.. only.
    """
    starts = rows.subject_pos
    t = lambda x: torch.tensor(x, device=device, dtype=torch.long)   # long even when a group has no targets
    ids, suffix_mask = pad_right(tok, [r[s:] for r, s in zip(rows.ids, starts)], device)
    width = max(starts)
    prefix_mask = torch.zeros(len(starts), width, dtype=torch.long, device=device)
    for b, start in enumerate(starts):
        prefix_mask[b, width - start:] = 1
    start_of, target_row, kl_rows, fact_of = t(starts), t(rows.target_row), t(rows.kl_rows), t(rows.fact_of)
    batch = SuffixBatch(ids, torch.cat([prefix_mask, suffix_mask], 1),
                        start_of[:, None] + torch.arange(ids.shape[1], device=device),
                        _cached_prefixes(model, tok, rows, device), fact_of, target_row,
                        t(rows.target_pos) - start_of[target_row], t(rows.target_id), fact_of[target_row],
                        kl_rows, suffix_mask[kl_rows].sum(1) - 1, fact_of[kl_rows])
    blocks = [module_name(model, "layer", j) for j in range(layer + 1)]
    with record(model, blocks, whole=True) as outputs, stop_after(model, blocks[-1:]):
        _suffix_hidden(model, batch)
    batch.below = {name: outputs[name] for name in blocks}
    return batch


def _suffix_hidden(model, batch):
    """Final hidden states of the suffix rows, after the cached prefixes (no LM head: we pick positions first)."""
    cache = kv_cache(model, batch.past) if batch.past else None
    return model.base_model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                            past_key_values=cache, use_cache=cache is not None).last_hidden_state


def _with_delta(batch, deltas):
    """Replayed outputs for blocks 0..layer; the edited block's gets deltas[fact] added at the subject (suffix 0).

    δ goes into the block's output, the residual stream, at the subject's last token. The block's output is its
    input plus attention plus MLP output, so this is the same as adding δ to the MLP output there: v* = v_old + δ.
    """
    *below, edited = batch.below
    recorded = batch.below[edited]

    def edited_output():
        """The recorded output plus δ at the subject."""
        hidden = first_tensor(recorded).clone()
        hidden[:, 0] += deltas[batch.fact_of].to(hidden.dtype)
        return replace_first_tensor(recorded, hidden)
    return {**{name: batch.below[name] for name in below}, edited: edited_output}


def logits_with_delta(model, batch, deltas):
    """Logits at the target positions and at the KL positions, with deltas[fact] added at each subject."""
    with replay(model, _with_delta(batch, deltas)):
        hidden = _suffix_hidden(model, batch)
    head = model.get_output_embeddings()
    return (head(hidden[batch.target_row, batch.target_pos]).float(),
            head(hidden[batch.kl_rows, batch.kl_pos]).float())


def _chunks(n, chunk, center):
    """(start, stop) of the facts optimised together; with `center`, near-equal chunks, none below `chunk`."""
    if center:  # a fact alone in a chunk would lose its whole δ
        k = max(1, n // chunk)
        bounds = [i * n // k for i in range(k + 1)]
    else:
        bounds = list(range(0, n, chunk)) + [n]
    return list(zip(bounds, bounds[1:]))


def compute_deltas(model, tok, requests, layer, prefixes, cfg=ValueConfig(), chunk=None, center=False,
                   norm_of="mlp_out"):
    """δ per request (n, d_model) at the output of block `layer`, so v* = v_old + δ; plus per-chunk NLL histories.

    `chunk`: facts optimised together (None: CHUNK for the device). Their losses are independent (each δ sits in
    its own rows), and a fact whose NLL fell below stop_loss keeps its δ, as if optimised alone.
    `center` (MEMIT's center_deltas, chapter 5): after every step the δ of a chunk lose their mean.
    `norm_of`: the output whose norm on the bare prompt the decay and the clamp are relative to, as in the
    official code: "mlp_out" (ROME, the value v_old) or "layer" (MEMIT, the residual h^L).
    """
    device = next(model.parameters()).device
    chunk = chunk or CHUNK["cpu" if device.type == "cpu" else "accelerator"]
    deltas, history = [], []
    for start, stop in _chunks(len(requests), chunk, center):
        d, h = _optimise_chunk(model, tok, requests[start:stop], layer, prefixes, cfg, center, norm_of)
        deltas.append(d)
        history.append(h)
    return torch.cat(deltas), history


@dataclass
class _Objective:
    """What v*'s loss needs besides δ: the batches, the targets' ids and owners, ‖v_old‖ and P_before."""
    groups: list
    target_id: torch.Tensor
    target_fact: torch.Tensor
    kl_fact: torch.Tensor
    tokens_per_fact: torch.Tensor
    v_norm: torch.Tensor
    d_model: int
    log_p_before: torch.Tensor = None


def _objective(model, tok, requests, layer, prefixes, cfg, norm_of="mlp_out"):
    """Build the batches and targets of v*'s loss for these requests (P_before comes with the first step)."""
    device = next(model.parameters()).device
    rows = value_rows(tok, requests, prefixes, cfg.wordings)
    groups = [split_at_subject(model, tok, g, layer, device) for g in _by_suffix_length(rows)]
    cat = lambda key: torch.cat([getattr(g, key) for g in groups])
    target_fact = cat("target_fact")
    tokens = torch.zeros(len(requests), device=device).index_add_(0, target_fact, torch.ones_like(target_fact,
                                                                                                  dtype=torch.float))
    # ‖v_old‖ (ROME; MEMIT: ‖h^L‖) at the subject of the bare prompt scales the decay and the clamp
    v_old = read_at_subject(model, tok, requests, [""], {"v": (module_name(model, norm_of, layer), "output")})
    return _Objective(groups, cat("target_id"), target_fact, cat("kl_fact"), tokens,
                      v_old["v"].norm(dim=-1).clamp_min(1e-6), v_old["v"].shape[-1])


def _value_loss(model, obj, deltas, cfg):
    """Per fact: (ROME eq. 4 loss, target NLL). KL(P_now ‖ P_before): the edited model's distribution first."""
    n = len(deltas)
    target_logits, kl_logits = (torch.cat(p) for p in zip(*[logits_with_delta(model, g, deltas) for g in obj.groups]))
    log_p_now = torch.log_softmax(kl_logits, -1)
    if obj.log_p_before is None:   # the first step runs with δ = 0: the unedited distribution
        obj.log_p_before = log_p_now.detach()
    nll_tok = torch.nn.functional.cross_entropy(target_logits, obj.target_id, reduction="none")
    # the mean over a fact's prompts of the per-prompt mean NLL (every prompt has the same target tokens)
    nll = torch.zeros(n, device=deltas.device).index_add(0, obj.target_fact, nll_tok) / obj.tokens_per_fact
    kl_row = torch.nn.functional.kl_div(obj.log_p_before, log_p_now, log_target=True, reduction="none").sum(-1)
    kl = torch.zeros(n, device=deltas.device).index_add(0, obj.kl_fact, kl_row)   # one KL row per fact
    decay = cfg.weight_decay * deltas.norm(dim=-1) / obj.v_norm ** 2   # the official code's form: ‖δ‖, not ‖δ‖²
    return nll + cfg.kl_factor * kl + decay, nll


def _optimise_chunk(model, tok, requests, layer, prefixes, cfg, center=False, norm_of="mlp_out"):
    """Adam on δ for a few requests at once; returns δ and the largest NLL of the chunk at each step."""
    obj = _objective(model, tok, requests, layer, prefixes, cfg, norm_of)
    deltas = torch.zeros(len(requests), obj.d_model, device=obj.v_norm.device, requires_grad=True)
    optimizer = torch.optim.Adam([deltas], lr=cfg.lr)
    done = torch.zeros(len(requests), dtype=torch.bool, device=deltas.device)
    history = []
    with torch.enable_grad():
        for _ in range(cfg.steps):
            optimizer.zero_grad()
            loss, nll = _value_loss(model, obj, deltas, cfg)
            history.append(nll.detach().max().item())
            done |= nll.detach() < cfg.stop_loss
            if done.all():
                break
            loss.sum().backward()
            kept = deltas.detach()[done].clone()
            optimizer.step()
            with torch.no_grad():
                _clamp(deltas, cfg.clamp_factor * obj.v_norm)
                deltas[done] = kept          # a fact that reached stop_loss stops, as if optimised alone
                if center:  # the part all facts share moves other subjects too (MEMIT, chapter 5)
                    deltas.sub_(deltas.mean(0, keepdim=True))
    return deltas.detach(), history


def _clamp(deltas, max_norm):
    """The norm clamp, in place: each δ scaled down to at most max_norm (ROME: clamp_factor × ‖v_old‖)."""
    scale = (max_norm[:, None] / deltas.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
    deltas.mul_(scale)


# ---- The reference implementation: one whole forward pass per prompt, no caches, the paper's equations ----

def read_one(model, tok, prefix, text, subject, path, what="output"):
    """One module's input or output at the subject's last token of '<prefix>. <text>' (a whole forward pass)."""
    ids, pos = encode_in_context(tok, prefix, text, subject)
    device = next(model.parameters()).device
    with torch.no_grad(), record(model, path, what=what) as store:
        model(input_ids=torch.tensor([ids], device=device))
    return store[path][0, pos].float()


def reference_key(model, tok, request, layer, prefixes):
    """ROME eq. 3: k* = (1/N) Σ_j k(x_j + s), the down projection's input at the subject after each prefix x_j."""
    path = module_name(model, "mlp_out", layer)
    return torch.stack([read_one(model, tok, p, request.prompt_text, request.subject, path, "input")
                        for p in prefixes]).mean(0)


def _log_probs_with(model, ids, pos, layer, delta):
    """Next-token log-probabilities at every position of `ids`, δ added at block `layer`'s output at `pos`, the
    subject's last token (there it equals adding δ to the MLP output, through the residual connection)."""
    device = next(model.parameters()).device
    with add_at(model, module_name(model, "layer", layer), pos, delta):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    return torch.log_softmax(logits, -1)


def _target_nll(model, tok, request, prompts, layer, delta):
    """Eq. 4's first term: −log P(o* | x_j + p) per target token, averaged over the tokens of every prompt."""
    total, count = 0.0, 0
    for prefix, text in prompts:
        ids, pos = encode_in_context(tok, prefix, text, request.subject)
        target = tok(join(text, request.target_new), add_special_tokens=False).input_ids
        log_p = _log_probs_with(model, ids + target[:-1], pos, layer, delta)
        for t, token in enumerate(target):   # teacher forcing: position len(ids) - 1 + t predicts target[t]
            total = total - log_p[len(ids) - 1 + t, token]
            count += 1
    return total / count


def reference_value(model, tok, request, layer, prefixes, cfg, norm_of="mlp_out"):
    """ROME eq. 4: δ minimising NLL(target | prefixed prompts) + kl_factor·KL(P_now ‖ P_before on '{s} is a')
    + weight decay, clamped to clamp_factor·‖v_old‖ after each Adam step. Returns δ and the NLL per step."""
    # ‖v_old‖ on the bare prompt (MEMIT: norm_of="layer", the residual h^L) scales the decay and the clamp
    v_old = read_one(model, tok, "", request.prompt_text, request.subject, module_name(model, norm_of, layer))
    delta = torch.zeros_like(v_old, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    prompts = value_prompts(request, prefixes, cfg.wordings)
    essence = encode_in_context(tok, "", essence_prompt(request), request.subject)
    log_p_before, losses = None, []
    with torch.enable_grad():
        for _ in range(cfg.steps):
            optimizer.zero_grad()
            nll = _target_nll(model, tok, request, prompts, layer, delta)
            log_p_now = _log_probs_with(model, *essence, layer, delta)[-1]
            log_p_before = log_p_now.detach() if log_p_before is None else log_p_before
            kl = (log_p_now.exp() * (log_p_now - log_p_before)).sum()      # KL(P_now ‖ P_before)
            decay = cfg.weight_decay * delta.norm() / v_old.norm() ** 2      # as the official code: ‖δ‖/‖v_old‖²
            losses.append(nll.item())
            if nll.item() < cfg.stop_loss:
                break
            (nll + cfg.kl_factor * kl + decay).backward()
            optimizer.step()
            with torch.no_grad():
                max_norm = cfg.clamp_factor * v_old.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return delta.detach(), losses
