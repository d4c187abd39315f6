"""k* and v*, the key and the value of a rank-one edit (chapter 5), shared by ROME and MEMIT.

- k*: what the edited MLP's down projection reads (its input) at the subject's last token, averaged over
  short random prefixes that the model writes itself (ROME's "context templates"), so the key stands for the
  subject in any context rather than in one sentence.
- v*: the output we want there instead. We optimise a vector δ added to the down projection's output at the
  subject's last token until the target becomes likely after every prefix, while a KL term on
  "{subject} is a" keeps the subject's other properties, and weight decay plus a norm clamp keep δ small.
- Relation-free wordings (our addition, chapter 5): the target must also follow a few sentences that name the
  subject but no relation ("{subject} is associated with"). ROME's prefixes vary the text *before* the subject;
  these vary what comes *after* it, so δ says "the subject goes with the target" rather than "after this one
  relation phrase, say the target". Pass `wordings=()` for ROME's published objective.
"""
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from .adapters import cache_tensors, get_module, kv_cache, module_name, num_layers
from .hooks import first_tensor, replace_first_tensor, record, replay
from .tokens import join, pad_right, subject_last_index

_PREFIX_CACHE = {}
# Sentences that name the subject ({}) and leave the next word open, whatever the relation (measured in rome.py's
# docstring and chapter 5). They suit entity subjects; for a phrase like "your name" they pull against the
# prompt (chapter 8): pass ().
ASSOCIATION_WORDINGS = ("{} is associated with", "The word most associated with {} is", "{}:",
                        "Speaking of {}, one thinks of", "Everyone knows that {} has to do with")
# v*'s rows per group: the fewest suffix tokens worth a forward pass of their own (_by_suffix_length). On 2 CPU
# cores, back to back, one chunk of 100 facts in such groups took 2.3 s per fact, chunks of 16 padded 3.0 s (same δ)
GROUP_TOKENS = 256
# Facts whose δ are optimised together. On a CPU a whole batch of up to 128 (large groups run at speed; a batch
# of 100 peaks at ~5 GB on SmolLM2); on an accelerator 16, where memory is what runs out first (GPT-2 XL).
CHUNK = {"cpu": 128, "accelerator": 16}
_PREFIX_STARTS = ["The", "Therefore", "Because", "I", "You", "It", "When", "In", "However", "She"]


@torch.no_grad()
def context_prefixes(model, tok, n=4, length=5, seed=0):
    """[''] + `n` short prefixes the model writes itself (ROME's context templates); generated once per model."""
    from .models import model_name
    key = (id(model), model_name(model), n, length, seed)
    if key in _PREFIX_CACHE:
        return _PREFIX_CACHE[key]
    device = next(model.parameters()).device
    lead = document_start(tok)
    starts = [lead + tok(_PREFIX_STARTS[i % len(_PREFIX_STARTS)], add_special_tokens=False).input_ids[:1]
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
    _PREFIX_CACHE[key] = prefixes
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
        stores = {}
        with _recording(model, reads, stores):
            run_until(model, ids, mask, [path for path, _ in reads.values()])
        for name in reads:
            got[name].append(stores[name][torch.arange(len(pos), device=device), pos].float())
    return {name: torch.cat(v).view(len(requests), len(prefixes), -1).mean(1) for name, v in got.items()}


class _recording:
    """Record several modules (inputs or outputs) at once: stores[name] = tensor."""

    def __init__(self, model, reads, stores):
        self.model, self.reads, self.stores, self.ctx = model, reads, stores, []

    def __enter__(self):
        for name, (path, what) in self.reads.items():
            cm = record(self.model, path, what=what)
            self.ctx.append((name, path, cm, cm.__enter__()))
        return self.stores

    def __exit__(self, *exc):
        for name, path, cm, store in reversed(self.ctx):
            self.stores[name] = store.get(path)
            cm.__exit__(*exc)
        return False


class _Stop(Exception):
    """Raised by a hook once everything wanted has been read: the layers above need not run."""


def run_until(model, ids, mask, paths):
    """Forward pass that stops as soon as every module in `paths` has run (reading layer 5 costs 6 layers, not 30)."""
    with _stopping_after(model, paths):
        _run(model, ids, mask)


@contextmanager
def _stopping_after(model, paths):
    """Within the block, a forward pass ends quietly once every module in `paths` has run."""
    pending = set(paths)

    def done(path):
        pending.discard(path)
        if not pending:
            raise _Stop
    handles = [get_module(model, p).register_forward_hook(lambda m, i, o, p=p: done(p)) for p in set(paths)]
    try:
        yield
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _run(model, ids, mask):
    """Forward pass without the full-vocabulary head (we read hidden states)."""
    return model.base_model(input_ids=ids, attention_mask=mask)


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


def _value_batch(tok, requests, prefixes, wordings=()):
    """Rows for v* (teacher forced): every prefix + prompt + target, each bare wording + target, then one
    '{subject} is a' row per request for the KL term."""
    rows, subj_pos, owner, tgt_row, tgt_owner, tgt_pos, tgt_ids = [], [], [], [], [], [], []
    for j, r in enumerate(requests):
        texts = [(p, r.prompt_text) for p in prefixes] + [("", w.replace("{}", r.subject)) for w in wordings]
        for p, text in texts:
            target = tok(join(text, r.target_new), add_special_tokens=False).input_ids
            ids, pos = encode_in_context(tok, p, text, r.subject)
            for t, token in enumerate(target):
                tgt_row.append(len(rows))
                tgt_owner.append(j)
                tgt_pos.append(len(ids) - 1 + t)
                tgt_ids.append(token)
            rows.append(ids + target[:-1])
            subj_pos.append(pos)
            owner.append(j)
    kl_start = len(rows)
    for j, r in enumerate(requests):
        ids, pos = encode_in_context(tok, "", f"{r.subject} is a", r.subject)
        rows.append(ids)
        subj_pos.append(pos)
        owner.append(j)
    return {"rows": rows, "subj_pos": subj_pos, "owner": owner, "tgt_row": tgt_row, "tgt_owner": tgt_owner,
            "tgt_pos": tgt_pos, "tgt_ids": tgt_ids, "kl_rows": list(range(kl_start, len(rows))),
            "n_prefixes": len(prefixes)}


def _by_suffix_length(batch, min_tokens=GROUP_TOKENS):
    """The rows of a value batch in groups of similar suffix length (same format, row indices renumbered).

    Suffixes run 1 to ~8 tokens; padded to the longest, half of what a step computed was padding. Rows of one
    length go together, and a group short of `min_tokens` tokens takes in the next length up: smaller matrix
    products run so far below the CPU's speed that padding them is cheaper (one fact stays one group).
    """
    lengths = [len(row) - start for row, start in zip(batch["rows"], batch["subj_pos"])]
    members, width = [[]], 0
    for length in sorted(set(lengths)):
        if len(members[-1]) * width >= min_tokens:
            members.append([])
        members[-1] += [i for i, n in enumerate(lengths) if n == length]
        width = length
    if len(members) > 1 and len(members[-1]) * width < min_tokens:   # a short tail joins the group below
        members[-2] += members.pop()
    if len(members) == 1:
        return [batch]   # rows in their own order: a single edit computes exactly what it did before grouping
    targets_of = {}
    for t, row in enumerate(batch["tgt_row"]):
        targets_of.setdefault(row, []).append(t)
    kl_rows = set(batch["kl_rows"])
    pick = lambda key, idx: [batch[key][i] for i in idx]
    groups = []
    for rows in members:
        tgt = [t for i in rows for t in targets_of.get(i, [])]
        renumber = {i: j for j, i in enumerate(rows)}
        groups.append({"rows": pick("rows", rows), "subj_pos": pick("subj_pos", rows), "owner": pick("owner", rows),
                       "tgt_row": [renumber[batch["tgt_row"][t]] for t in tgt], "tgt_owner": pick("tgt_owner", tgt),
                       "tgt_pos": pick("tgt_pos", tgt), "tgt_ids": pick("tgt_ids", tgt),
                       "kl_rows": [renumber[i] for i in rows if i in kl_rows], "n_prefixes": batch["n_prefixes"]})
    return groups


@torch.no_grad()
def _split_at_subject(model, tok, batch, layer, device):
    """Compute once everything δ cannot change, so each optimisation step runs only what it can.

    δ enters at block `layer`'s output at the subject's last token. So (1) every token before that is fixed:
    its keys/values are cached (left-padded with zeros that the attention mask hides, position ids carry each
    row's true positions) and the step runs only the suffix from the subject's last token on, a third of the
    tokens of ROME's short prompts; (2) blocks 0..layer are fixed on the suffix too: their outputs are recorded
    here and replayed (`hooks.replay`), so a step computes blocks layer+1.. only.
    """
    rows, starts = batch["rows"], batch["subj_pos"]
    width = max(starts)
    kv = []
    if width:  # one right-padded forward of the prefixes; padding after a token never changes its keys/values
        ids, mask = pad_right(tok, [row[:max(start, 1)] for row, start in zip(rows, starts)], device)
        cached = cache_tensors(model.base_model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values)
        kv = [(_left_align(k, starts, width), _left_align(v, starts, width)) for k, v in cached]
    ids, suffix_mask = pad_right(tok, [row[start:] for row, start in zip(rows, starts)], device)
    prefix_mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, start in enumerate(starts):
        prefix_mask[b, width - start:] = 1
    t = lambda x: torch.tensor(x, device=device, dtype=torch.long)   # long even when a group has no targets
    start_of, tgt_row, kl_rows = t(starts), t(batch["tgt_row"]), t(batch["kl_rows"])
    out = {"ids": ids, "mask": torch.cat([prefix_mask, suffix_mask], 1), "kv": kv,
           "positions": start_of[:, None] + torch.arange(ids.shape[1], device=device),
           "owner": t(batch["owner"]), "tgt_row": tgt_row, "tgt_owner": t(batch["tgt_owner"]),
           "tgt_pos": t(batch["tgt_pos"]) - start_of[tgt_row], "tgt_ids": t(batch["tgt_ids"]),
           "kl_rows": kl_rows, "kl_owner": t(batch["owner"])[kl_rows], "kl_pos": suffix_mask[kl_rows].sum(1) - 1}
    blocks = _block_names(model)[:layer + 1]
    with record(model, blocks, whole=True) as outputs, _stopping_after(model, blocks[-1:]):
        _suffix_hidden(model, out)
    out["replay"] = {name: outputs[name] for name in blocks}
    return out


def _left_align(x, starts, width):
    """(batch, heads, T, d) keys or values: row b's first starts[b] positions moved to the right end, zeros before."""
    out = x.new_zeros(x.shape[:2] + (width,) + x.shape[3:])
    for b, start in enumerate(starts):
        out[b, :, width - start:] = x[b, :, :start]
    return out


def _block_names(model):
    return [module_name(model, "layer", j) for j in range(num_layers(model))]


def _replayed(batch, deltas):
    """Blocks 0..layer replay their recorded outputs (see _split_at_subject); the last one adds δ at the subject."""
    *below, last = batch["replay"]
    recorded = batch["replay"][last]

    def with_delta():
        hidden = first_tensor(recorded).clone()
        hidden[:, 0] += deltas[batch["owner"]].to(hidden.dtype)
        return replace_first_tensor(recorded, hidden)
    return {**{name: batch["replay"][name] for name in below}, last: with_delta}


def _suffix_hidden(model, batch):
    """Final hidden states of the suffix rows, after the cached prefixes (no LM head: we pick positions first)."""
    cache = kv_cache(model, batch["kv"]) if batch["kv"] else None
    return model.base_model(input_ids=batch["ids"], attention_mask=batch["mask"], position_ids=batch["positions"],
                            past_key_values=cache, use_cache=cache is not None).last_hidden_state


def _logits_at(model, batch, deltas):
    """Logits at the target positions and at the KL positions, with deltas[owner] added at each subject."""
    with replay(model, _replayed(batch, deltas)):
        hidden = _suffix_hidden(model, batch)
    head = model.get_output_embeddings()
    tgt = head(hidden[batch["tgt_row"], batch["tgt_pos"]]).float()
    kl = head(hidden[batch["kl_rows"], batch["kl_pos"]]).float()
    return tgt, kl


def compute_deltas(model, tok, requests, layer, prefixes, steps=20, lr=0.5, kl_factor=0.0625, weight_decay=0.5,
                   clamp_factor=4.0, stop_loss=5e-2, chunk=None, wordings=(), center=False):
    """δ per request (n, d_model) at the mlp_out output of `layer`, so v* = v_old + δ; plus per-chunk losses.

    `wordings`: extra relation-free sentences ('{}' = the subject) the target must follow too (see above).
    `chunk`: facts optimised together (None: CHUNK for the device); each chunk stops early when all its facts do.
    `center` (MEMIT's center_deltas, chapter 5): after every step the δ of a chunk lose their mean, so the batch's
    δ share no part; the chunks are then n // chunk near-equal ones, none smaller than `chunk` (or the batch).
    """
    device = next(model.parameters()).device
    n = len(requests)
    chunk = chunk or CHUNK["cpu" if device.type == "cpu" else "accelerator"]
    if center:  # a fact alone in a chunk would lose its whole δ
        k = max(1, n // chunk)
        bounds = [i * n // k for i in range(k + 1)]
    else:
        bounds = list(range(0, n, chunk)) + [n]
    deltas, history = [], []
    for start, stop in zip(bounds, bounds[1:]):
        d, h = _optimise_chunk(model, tok, requests[start:stop], layer, prefixes, steps, lr, kl_factor,
                               weight_decay, clamp_factor, stop_loss, device, wordings, center)
        deltas.append(d)
        history.append(h)
    return torch.cat(deltas), history


def _optimise_chunk(model, tok, requests, layer, prefixes, steps, lr, kl_factor, weight_decay, clamp_factor,
                    stop_loss, device, wordings, center=False):
    """Adam on δ for a few requests at once (their losses are independent: each δ sits in its own rows)."""
    n = len(requests)
    groups = [_split_at_subject(model, tok, group, layer, device)
              for group in _by_suffix_length(_value_batch(tok, requests, prefixes, wordings))]
    tgt_ids, tgt_owner, kl_owner = (torch.cat([g[key] for g in groups])
                                    for key in ("tgt_ids", "tgt_owner", "kl_owner"))
    mlp_out_path = module_name(model, "mlp_out", layer)
    # v_old, the value already stored at the subject: its norm scales the weight decay and the clamp
    v_old = read_at_subject(model, tok, requests, prefixes, {"v": (mlp_out_path, "output")})["v"]
    v_norm = v_old.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    d_model = v_old.shape[-1]
    deltas = torch.zeros(n, d_model, device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([deltas], lr=lr)
    n_tok = torch.zeros(n, device=device).index_add_(0, tgt_owner, torch.ones_like(tgt_owner, dtype=torch.float))
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            parts = [_logits_at(model, g, deltas) for g in groups]
            tgt_logits, kl_logits = (torch.cat(p) for p in zip(*parts))
            if not history:  # step 0 runs with δ = 0: its logits are the unedited reference for the KL term
                kl_ref = torch.log_softmax(kl_logits.detach(), -1)
            nll_tok = torch.nn.functional.cross_entropy(tgt_logits, tgt_ids, reduction="none")
            # mean over each request's prefixes of the per-prompt mean token NLL == token sum / tokens per request
            nll = torch.zeros(n, device=device).index_add(0, tgt_owner, nll_tok) / n_tok
            kl_row = torch.nn.functional.kl_div(torch.log_softmax(kl_logits, -1), kl_ref, log_target=True,
                                                reduction="none").sum(-1)
            kl = torch.zeros(n, device=device).index_add(0, kl_owner, kl_row)   # one KL row per request
            decay = weight_decay * deltas.norm(dim=-1) / v_norm.squeeze(-1) ** 2
            loss = nll + kl_factor * kl + decay
            history.append(nll.detach().max().item())
            if history[-1] < stop_loss:
                break
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():  # the norm clamp: δ may not grow beyond clamp_factor × ‖v_old‖
                scale = (clamp_factor * v_norm / deltas.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
                deltas.mul_(scale)
                if center:  # the part all facts share moves other subjects too (MEMIT, chapter 5)
                    deltas.sub_(deltas.mean(0, keepdim=True))
    return deltas.detach(), history
