"""GRACE (Hartvigsen et al. 2023): each edit is an entry in a key–value codebook beside one layer (chapter 7).

Textbook §5.3 (附加参数法): no weight changes. An adaptor wraps one layer with a codebook of keys (the layer's
input at the last token of an edit prompt), values (what the layer outputs there instead) and deferral radii ε.
An input within ε of its nearest key gets that key's value; any other input runs the layer untouched. An edit
follows the paper's codebook rules (a key farther than ε_init + ε from every entry: add one; overlapping an entry
with the same label: expand its radius; another label: split both radii), then trains the value with Adam so
the model outputs the target. We wrap the MLP output projection (EasyEdit's choice on Llama-family models) at
the paper's depth (GPT2-XL: block 35 of 48), look up every position (so teacher-forced scoring and generation
both meet the prompt's last token), and replace the matched position only (EasyEdit's decoder setting; the
original code's "prompt" setting is an option). `reference_edit` is the algorithm in plain loops; `apply` is the
same, vectorised, with the blocks below the layer computed once. Undo removes the entries an edit added and puts
back the radii and values it changed; entries live in a hook, which goes with the last entry.
"""
import itertools
import weakref
from dataclasses import dataclass, field

import torch

from . import checks
from .adapters import check_layer, get_module, mlp_dims, module_name, num_layers
from .forward import split_below
from .hooks import attach, first_tensor, patch as patched_output, record, replace_first_tensor
from .optimise import clamped_adam
from .requests import EditError, as_request_list
from .t_patcher import answer_logits
from .tokens import answer_nll, encode_pairs

PAPER_DEPTH = 35 / 48            # GPT2-XL's GRACE layer: block 35 of 48 (the textbook's 第36层)
REPLACEMENTS = ("last", "prompt")
VALUE_INITS = ("cold", "warm")
SPLIT_GAP = 1e-5                 # the paper's split: the older radius stops just short of the halfway point
CANDIDATES = 8                   # nearest keys by matrix product that a lookup then measures exactly

# model -> {layer: Codebook} and model -> [CodebookEdit] (oldest first): live edits that undo() takes out, not caches.
_CODEBOOKS = weakref.WeakKeyDictionary()
_EDITS = weakref.WeakKeyDictionary()
_ENTRY_IDS = itertools.count(1)


def _choice(name, value, options):
    """Refuse anything but one of `options` (strings), naming the field."""
    if not isinstance(value, str) or value not in options:
        raise EditError(f"{name}: expected one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class Config:
    """GRACE's options; `eps_init` is the paper's ε_init, `steps` and `lr` its n_iter and edit_lr."""
    layer: int | None = None       # wrapped layer; None: the paper's depth, int(PAPER_DEPTH * layers) (21 of 30)
    eps_init: float = 1.0          # a new entry's deferral radius (paper and EasyEdit: 1.0)
    steps: int = 50                # Adam steps on the values (EasyEdit: 50 on Llama-3.2-1B)
    lr: float = 1.0
    replacement: str = "last"      # "last": the matched position only; "prompt": it and every position before it
    value_init: str = "cold"       # "cold": uniform in [0, 1) (the paper); "warm": the layer's own output there
    seed: int = 0                  # random generator of the cold values
    radius_margin: float = 0.0     # ours: added to radii the rules set from a distance (expand, split), see below
    progress: bool = False         # show a progress bar

    def __post_init__(self):
        if self.layer is not None and not checks.is_integer(self.layer):
            raise EditError(f"layer: expected an integer layer index, or None for the paper's depth; got "
                            f"{self.layer!r}")
        checks.number("eps_init", self.eps_init, 0, open_low=True,
                      hint="the radius is a Euclidean distance in the layer's input space")
        checks.integer("steps", self.steps, 1)
        checks.learning_rate(self.lr)
        _choice("replacement", self.replacement, REPLACEMENTS)
        _choice("value_init", self.value_init, VALUE_INITS)
        checks.integer("seed", self.seed, 0)
        checks.number("radius_margin", self.radius_margin, 0, desc="a finite number >= 0")
        checks.flag("progress", self.progress)


# radius_margin: an expanded radius is exactly the distance to the prompt that widened it, and a split on a re-edited
# prompt leaves its new entry a radius of ~0; the same prompt scored in another batch moves by float rounding
# (~3e-5 on SmolLM2) and can fall just outside. A margin of 1e-3 keeps such prompts inside; 0 is the paper.
# Ties: that split leaves two equal keys, and a lookup takes the newer (torch.min in the paper's code takes the
# older, whose radius the split made negative, so a re-edited prompt would get neither entry).


class Codebook:
    """One layer's GRACE adaptor: keys (N, d_in), values (N, d_out), radii (N,) in float32; a label and id each."""

    def __init__(self, model, layer, replacement):
        self.layer, self.replacement = layer, replacement
        self.name = module_name(model, "mlp_out", layer)
        d_out, d_in = mlp_dims(model, layer)
        device = next(model.parameters()).device
        self.keys = torch.zeros(0, d_in, device=device)
        self.values = torch.zeros(0, d_out, device=device)
        self.radii = torch.zeros(0, device=device)
        self.labels, self.ids = [], []
        self.training = None       # (rows, their values) while an edit trains them
        self.handle = None

    def __len__(self):
        return len(self.ids)

    def table(self):
        """Every entry's value, with the rows being trained taken from the trained tensor (differentiable)."""
        if self.training is None:
            return self.values
        rows, trained = self.training
        return self.values.index_put((rows,), trained)

    def nearest(self, x):
        """Nearest entry of each row of x (M, d_in) and its exact distance; of equally near entries, the newest.

        A matrix product ranks every key at once (fast, but rounded); the CANDIDATES closest are measured exactly.
        """
        x = x.float()
        candidates = torch.cdist(x, self.keys).topk(min(CANDIDATES, len(self)), dim=1, largest=False).indices
        exact = torch.linalg.vector_norm(x[:, None] - self.keys[candidates], dim=-1)
        best = exact.min(1, keepdim=True).values
        return torch.where(exact == best, candidates, -1).max(1).values, best[:, 0]

    @torch.no_grad()
    def match(self, x):
        """For x (B, S, d_in): which positions an entry replaces (B, S) and which entry (B, S)."""
        rows, dist = self.nearest(x.reshape(-1, x.shape[-1]))
        hit, rows = (dist <= self.radii[rows]).view(x.shape[:-1]), rows.view(x.shape[:-1])
        return spread_back(hit, rows) if self.replacement == "prompt" else (hit, rows)

    def output(self, x, out):
        """The layer's output `out` with each matched position replaced by its entry's value."""
        if not len(self):
            return out
        hit, rows = self.match(x)
        if self.training is None and not hit.any():
            return out
        return torch.where(hit.unsqueeze(-1), self.table()[rows].to(out.dtype), out)

    def append(self, key, value, radius, label):
        """Add one entry; returns its row."""
        self.keys = torch.cat([self.keys, key.float()[None]])
        self.values = torch.cat([self.values, value.float()[None].to(self.values.device)])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(label)
        self.ids.append(next(_ENTRY_IDS))
        return len(self.ids) - 1

    def state(self):
        """Everything an edit may change, copied: `set_state` puts it back."""
        return self.keys, self.values.clone(), self.radii.clone(), list(self.labels), list(self.ids)

    def set_state(self, state):
        """Put back what `state()` copied (a failed edit leaves the codebook as it found it)."""
        self.keys, self.values, self.radii, labels, ids = state
        self.labels, self.ids, self.training = list(labels), list(ids), None

    def remove(self, ids):
        """Drop the entries with these ids."""
        keep = [i for i, entry in enumerate(self.ids) if entry not in ids]
        index = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys, self.values, self.radii = self.keys[index], self.values[index], self.radii[index]
        self.labels, self.ids = [self.labels[i] for i in keep], [self.ids[i] for i in keep]

    def describe(self):
        """Size, radii and parameter count, for `info` and notebooks."""
        return {"layer": self.layer, "module": self.name, "replacement": self.replacement, "size": len(self),
                "radii": self.radii.tolist(), "parameters": self.keys.numel() + self.values.numel() + len(self)}


def spread_back(hit, rows):
    """replacement="prompt": each position takes the entry of the first matched position at or after it in its row."""
    width = hit.shape[1]
    position = torch.arange(width, device=hit.device).expand_as(hit)
    first_after = torch.where(hit, position, width).flip(1).cummin(1).values.flip(1)
    return first_after < width, rows.gather(1, first_after.clamp(max=width - 1))


def _install(model, codebook):
    """Route the wrapped layer's output through the codebook on every forward (a hook; weights untouched)."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        return replace_first_tensor(output, codebook.output(x, first_tensor(output)))
    codebook.handle = attach(model, codebook.name, hook, with_kwargs=True)
    _CODEBOOKS.setdefault(model, {})[codebook.layer] = codebook


def _uninstall(model, codebook):
    """Remove the codebook's hook and forget it (its last entry went)."""
    if codebook.handle is not None:
        codebook.handle.remove()
        codebook.handle = None
    installed = _CODEBOOKS.get(model, {})
    if installed.get(codebook.layer) is codebook:
        del installed[codebook.layer]


def codebooks(model):
    """{layer: Codebook} of every GRACE adaptor installed in `model`."""
    return dict(_CODEBOOKS.get(model, {}))


def describe(model):
    """{layer: size, radii, parameters} of every installed codebook (empty when GRACE added nothing)."""
    return {layer: cb.describe() for layer, cb in codebooks(model).items()}


def remove_all(model):
    """Take every GRACE codebook out of `model` (for notebooks that lost their EditResults)."""
    for codebook in codebooks(model).values():
        _uninstall(model, codebook)
    _EDITS.pop(model, None)


def resolve_layer(model, layer):
    """The wrapped layer: int(PAPER_DEPTH * layers) by default, else `layer` checked against the model."""
    if layer is None:
        return int(PAPER_DEPTH * num_layers(model))
    try:
        return check_layer(model, layer, "layer")
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def check_requests(model, tok, requests, cfg):
    """Refuse a replacement setting other than the one the layer's live codebook already uses."""
    cb = codebooks(model).get(resolve_layer(model, cfg.layer))
    if cb is not None and cb.replacement != cfg.replacement:
        raise EditError(f"replacement: layer {cb.layer}'s codebook replaces {cb.replacement!r} positions; edit it "
                        f"with replacement={cb.replacement!r}, or wrap another layer")


def touched_parameters(model, requests, cfg):
    """GRACE changes no weight: it adds codebook entries (checks the layer against the model)."""
    resolve_layer(model, cfg.layer)
    return []


def edit_batch(model, tok, requests):
    """Prompt + target batch; `prompt_lengths - 1` is each key's position, the last prompt token."""
    device = next(model.parameters()).device
    return encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests], device)


def labels_of(batch):
    """Each request's label: its target token ids, as a tuple (the paper's rules compare labels)."""
    return [tuple(batch["labels"][b][batch["answer_mask"][b]].tolist()) for b in range(len(batch["labels"]))]


def new_values(model, layer, cfg):
    """value(query) for each new entry, in order: uniform [0, 1) from cfg.seed ("cold") or the layer's output."""
    module = get_module(model, module_name(model, "mlp_out", layer))
    generator, d_out = torch.Generator().manual_seed(cfg.seed), mlp_dims(model, layer)[0]

    @torch.no_grad()
    def value(query):
        if cfg.value_init == "warm":           # forward(), not __call__: the layer's own output, no codebook
            return module.forward(query[None].to(next(module.parameters()).dtype))[0].float()
        return torch.rand(d_out, generator=generator).to(query.device)
    return value


@dataclass(eq=False)
class CodebookEdit:
    """What one edit did to a codebook: the entries it added, and (radius, value) before it of those it changed."""
    layer: int
    label: str
    added: list = field(default_factory=list)
    changed: dict = field(default_factory=dict)

    @property
    def entries(self):
        """Ids of every entry this edit added or changed (two edits sharing one must be undone newest first)."""
        return set(self.added) | set(self.changed)


def codebook_rules(cb, query, label, cfg, new_value, edit):
    """The paper's codebook maintenance for one key, noted in `edit`; returns (action, row it maps to, distance)."""
    def add(radius):
        row = cb.append(query, new_value(query), radius, label)
        edit.added.append(cb.ids[row])
        return row
    if not len(cb):
        return "add", add(cfg.eps_init), None
    row, dist = (t.item() for t in cb.nearest(query[None]))
    radius, entry = cb.radii[row].item(), cb.ids[row]
    if dist > cfg.eps_init + radius:
        return "add", add(cfg.eps_init), dist
    if entry not in edit.added:                        # an older entry: undo puts its radius and value back
        edit.changed.setdefault(entry, (radius, cb.values[row].clone()))
    if cb.labels[row] == label:                        # same answer: widen the entry to cover this key
        cb.radii[row] = max(radius, dist + cfg.radius_margin)
        return "expand", row, dist
    cb.radii[row] = dist / 2 - SPLIT_GAP               # another answer: split the distance between the two
    return "split", add(dist / 2 + cfg.radius_margin), dist



def _train(model, cb, rows, batch, fixed, cfg):
    """Adam on the chosen entries' values (blocks below replayed, LM head on the answer rows); returns the losses."""
    trained = cb.values[rows].clone()
    cb.training = (rows, trained)
    answers = batch["labels"][batch["answer_mask"]]

    def loss():
        return torch.nn.functional.cross_entropy(answer_logits(model, batch, fixed).float(), answers)
    losses = clamped_adam([trained], loss, cfg.steps, cfg.lr, desc="GRACE" if cfg.progress else None)
    cb.values, cb.training = cb.table().detach(), None
    if not torch.isfinite(cb.values).all():
        raise EditError("lr: a GRACE value became non-finite; lower lr")
    return losses


def _codebook_at(model, layer, replacement):
    """The layer's live codebook, or a new empty one (installed; the caller uninstalls it if it stays empty)."""
    cb = codebooks(model).get(layer)
    if cb is None:
        cb = Codebook(model, layer, replacement)
        _install(model, cb)
    return cb


def _undo(model, edit):
    """Take one edit's entries out and put back what it changed; refuse while a later edit changed the same entries."""
    live = _EDITS.get(model, [])
    if edit not in live:
        return                                         # already gone (remove_all)
    later = [e.label for e in live[live.index(edit) + 1:] if e.layer == edit.layer and e.entries & edit.entries]
    if later:
        raise EditError(f"undo: {edit.label} cannot be undone yet: later GRACE edits widened or split its codebook "
                        f"entries; undo them first, newest first: {', '.join(reversed(later))}")
    cb = _CODEBOOKS[model][edit.layer]
    cb.remove(set(edit.added))
    for entry, (radius, value) in edit.changed.items():
        row = cb.ids.index(entry)
        cb.radii[row], cb.values[row] = radius, value
    live.remove(edit)
    if not len(cb):
        _uninstall(model, cb)


def _label(requests):
    more = f" +{len(requests) - 1} more" if len(requests) > 1 else ""
    return f"GRACE edit ({requests[0].subject!r} -> {requests[0].target_new!r}{more})"


def apply(model, tok, requests, cfg):
    """Add, widen or split one codebook entry per request at `layer`'s MLP output, and train the values it maps to."""
    layer = resolve_layer(model, cfg.layer)
    batch = edit_batch(model, tok, requests)
    q_all, fixed = split_below(model, batch, layer, kind="mlp_out")
    rows = torch.arange(len(requests), device=q_all.device)
    keys = q_all[rows, batch["prompt_lengths"] - 1]                  # the input at each prompt's last token
    cb = _codebook_at(model, layer, cfg.replacement)
    saved, edit, new_value = cb.state(), CodebookEdit(layer, _label(requests)), new_values(model, layer, cfg)
    try:
        actions = []
        for i, (key, label) in enumerate(zip(keys, labels_of(batch))):
            action, row, dist = codebook_rules(cb, key, label, cfg, new_value, edit)
            actions.append({"request": i, "action": action, "entry": cb.ids[row], "nearest_distance": dist})
        rows = torch.tensor(sorted({cb.ids.index(a["entry"]) for a in actions}), device=keys.device)
        losses = _train(model, cb, rows, batch, fixed, cfg)
    except BaseException:
        cb.set_state(saved)
        if not len(cb):
            _uninstall(model, cb)
        raise
    _EDITS.setdefault(model, []).append(edit)
    hit, chosen = cb.match(keys[:, None])
    reached = [bool(h) and cb.ids[r] == a["entry"] for h, r, a in zip(hit[:, 0], chosen[:, 0].tolist(), actions)]
    info = {**cb.describe(), "codebook_size": len(cb), "actions": actions, "entries_added": list(edit.added),
            "reached": reached, "steps": len(losses), "losses": losses,
            "parameters_added": len(edit.added) * (cb.keys.shape[1] + cb.values.shape[1] + 1)}
    return {"restore": lambda: _undo(model, edit), "info": info}


# --- the paper's algorithm in plain code (loops over entries and positions, full forwards), to check `apply` ---

def _plain_nearest(entries, x):
    """(entry, distance) of the entry nearest to x, by a loop over every entry; of equally near ones, the newest."""
    dists = [torch.linalg.vector_norm(x.float() - e["key"]).item() for e in entries]
    i = max(range(len(entries)), key=lambda j: (-dists[j], j))
    return entries[i], dists[i]


def _plain_hit(entries, x):
    """The entry whose radius holds x (None if x is outside its nearest entry's radius)."""
    entry, dist = _plain_nearest(entries, x)
    return entry if dist <= entry["radius"] else None


def _plain_output(module, entries, x, replacement):
    """The wrapped layer's output for x (B, S, d_in), position by position, from the last position backwards."""
    out = module.forward(x).clone()                    # forward(): the bare layer (the live hook stays out)
    for b in range(x.shape[0]):
        current = None
        for s in reversed(range(x.shape[1])):
            hit = _plain_hit(entries, x[b, s])
            if hit is not None or replacement == "last":
                current = hit                          # "prompt" carries a hit back to the positions before it
            if current is not None:
                out[b, s] = current["value"].to(out.dtype)
    return out


def _plain_rules(entries, key, label, cfg, new_value):
    """The paper's codebook rules on a plain list of entries; returns the entry the key now maps to."""
    if entries:
        near, dist = _plain_nearest(entries, key)
    if not entries or dist > cfg.eps_init + near["radius"]:
        entries.append({"key": key, "value": new_value(key), "radius": cfg.eps_init, "label": label})
    elif near["label"] == label:
        near["radius"] = max(near["radius"], dist + cfg.radius_margin)
        return near
    else:
        near["radius"] = dist / 2 - SPLIT_GAP
        entries.append({"key": key, "value": new_value(key), "radius": dist / 2 + cfg.radius_margin, "label": label})
    return entries[-1]


def reference_edit(model, tok, requests, cfg=Config()):
    """GRACE in plain code, from a copy of the layer's live codebook: the entries after the edit, and the losses.

    Installs nothing. Entries are dicts (key, value, radius, label), in the codebook's order.
    """
    requests = as_request_list(requests)
    layer = resolve_layer(model, cfg.layer)
    name = module_name(model, "mlp_out", layer)
    batch = edit_batch(model, tok, requests)
    with torch.no_grad(), record(model, name, what="input") as seen:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    live = codebooks(model).get(layer)
    entries = [] if live is None else [{"key": k, "value": v.clone(), "radius": r, "label": lab} for k, v, r, lab
                                       in zip(live.keys, live.values, live.radii.tolist(), live.labels)]
    new_value, chosen = new_values(model, layer, cfg), []
    for b, label in enumerate(labels_of(batch)):
        key = seen[name][b, int(batch["prompt_lengths"][b]) - 1].float()  # the input at the prompt's last token
        entry = _plain_rules(entries, key, label, cfg, new_value)
        chosen += [entry] if all(entry is not c for c in chosen) else []
    module = get_module(model, name)

    def loss():
        with record(model, name, what="input") as x, \
                patched_output(model, name, lambda out: _plain_output(module, entries, x[name], cfg.replacement)):
            return answer_nll(model, batch)
    losses = clamped_adam([e["value"] for e in chosen], loss, cfg.steps, cfg.lr)
    return entries, losses
