"""KN, Knowledge Neurons (Dai et al. 2022): find the few FFN neurons that express a fact, rewrite their values.

The first locate-then-edit method (定位编辑法, chapter 5). An FFN is a key–value memory, FFN(x) = Σ_i a_i v_i; a
knowledge neuron is one activation a_i (an input of the down projection). Locate: integrated gradients of
P(old answer) at the prompt's last token for every searched neuron (attribution.py), on the prompt and on
`n_prefixes` copies after model-written prefixes (the paper uses paraphrases; a request has one prompt). Keep
attribution > threshold·max per prompt, then neurons found in more than `share` of the prompts (lowered by 0.05
while fewer than `min_neurons`, as the authors' code does), at most `max_neurons`, none that also serve more than
`relation_share` of the relation's other facts (the template with `relation_subjects`). Edit ("updating facts"):
v_i ← v_i − λ1·E[y_old] + λ2·E[y_new], E the output embeddings of the answers' first tokens (tied to the input ones
in SmolLM2), λ1 = 1, λ2 = 8 as published. Ours, off by default (IMPROVED, with λ2 = 4): `signed`, since a gated
MLP's a_i is negative about as often as positive, and there the published change pushes the wrong way.
touched_parameters names every searched down projection: locating costs hundreds of backward passes, so it runs
inside the timed edit; info lists the neurons. `reference_edit` is the algorithm in plain code (one layer and step
per forward, sets), tested equal to `apply`.
"""
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import as_out_in, layer_module, mlp_out_weight_name, module_name, num_layers
from .attribution import attribution, next_token_prob, reference_attribution
from .hooks import record
from .keys_values import context_prefixes, encode_in_context
from .requests import EditError, as_request_list
from .t_patcher import CONTRAST_SUBJECTS
from .tokens import join

SHARE_STEP = 0.05   # how much the authors' code lowers p when a fact has too few knowledge neurons
# Other subjects in the request's template: the "intra-relation facts" whose shared neurons the update leaves alone.
RELATION_SUBJECTS = CONTRAST_SUBJECTS[:5]
# Our configuration, "kn+ours" in the bench: `signed`, with λ2 chosen with it on 16 CounterFact train facts
# (λ2 = 4 raised reliability, paraphrase and locality above the published λ2 = 8's; 8 loses locality).
IMPROVED = dict(signed=True, lambda2=4.0)


def _layers_option(layers):
    """None (every layer), or a tuple of distinct layer indices; the range is checked against the model later."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return None
    if checks.is_integer(layers):
        return (int(layers),)
    if (isinstance(layers, (list, tuple)) and layers and all(checks.is_integer(x) for x in layers)
            and len(set(layers)) == len(layers)):
        return tuple(int(x) for x in layers)
    raise EditError(f"layers: expected None or 'all' (every layer), a layer index or a list of distinct ones, got "
                    f"{layers!r}")


@dataclass(frozen=True)
class Config:
    """KN's hyperparameters: the paper's m, t, p, λ1, λ2; the neuron counts of the authors' code."""
    layers: tuple | None = None     # layers searched for knowledge neurons; None: all
    ig_steps: int = 20              # m: Riemann steps of the integrated gradients
    threshold: float = 0.2          # t: per prompt, keep attribution > t · its maximum
    share: float = 0.7              # p: keep neurons found in more than this fraction of the prompts
    min_neurons: int = 2            # lower p (by 0.05) until at least this many neurons are kept
    max_neurons: int = 5            # keep at most this many (most shared first, then largest attribution)
    lambda1: float = 1.0            # λ1: weight of the old answer's embedding taken out of each value
    lambda2: float = 8.0            # λ2: weight of the new answer's embedding put in
    n_prefixes: int = 4             # prompts besides the bare one: the prompt after model-written prefixes
    prefix_len: int = 5             # tokens per prefix
    relation_subjects: tuple = RELATION_SUBJECTS   # other facts of the relation: the template with these subjects
    relation_share: float = 0.1     # skip neurons that are knowledge neurons of more than this share of them
    scale_by_value_norm: bool = False   # the authors' code: λ's times ‖v_i‖ / ‖E[y]‖ (the paper: plain λ's)
    signed: bool = False            # ours: flip the change where the neuron's activation is negative (gated MLPs)
    progress: bool = False

    def __post_init__(self):
        """Check every field; a bad one raises EditError naming it."""
        object.__setattr__(self, "layers", _layers_option(self.layers))
        checks.integer("ig_steps", self.ig_steps, 1)
        checks.number("threshold", self.threshold, 0, 1, desc="a fraction from 0 to 1 of the largest attribution")
        checks.number("share", self.share, 0, 1, desc="a fraction from 0 to 1 of the prompts")
        checks.integer("min_neurons", self.min_neurons, 1)
        checks.integer("max_neurons", self.max_neurons, 1)
        if self.max_neurons < self.min_neurons:
            raise EditError(f"max_neurons: expected at least min_neurons ({self.min_neurons}), got {self.max_neurons}")
        checks.number("lambda1", self.lambda1, 0)
        checks.number("lambda2", self.lambda2, 0)
        checks.integer("n_prefixes", self.n_prefixes, 0)
        checks.integer("prefix_len", self.prefix_len, 1)
        if not (isinstance(self.relation_subjects, (list, tuple))
                and all(isinstance(x, str) and x.strip() for x in self.relation_subjects)):
            raise EditError(f"relation_subjects: expected a list of subject names (or [] to skip the relation "
                            f"filter), got {self.relation_subjects!r}")
        object.__setattr__(self, "relation_subjects", tuple(self.relation_subjects))
        checks.number("relation_share", self.relation_share, 0, 1, desc="a fraction from 0 to 1 of the other facts")
        for name in ("scale_by_value_norm", "signed", "progress"):
            checks.flag(name, getattr(self, name))


def search_layers(model, cfg):
    """The layers searched on this model (all by default), each checked to exist."""
    n = num_layers(model)
    if cfg.layers is None:
        return list(range(n))
    bad = [layer for layer in cfg.layers if not 0 <= layer < n]
    if bad:
        raise EditError(f"layers: layer {bad[0]} is out of range; this model has {n} layers, so use indices from 0 "
                        f"to {n - 1}")
    return list(cfg.layers)


def touched_parameters(model, requests, cfg):
    """Every searched layer's down projection: which ones hold knowledge neurons is known only after locating."""
    return [mlp_out_weight_name(model, layer) for layer in search_layers(model, cfg)]


def first_token(tok, prompt, answer):
    """The id of the answer's first token after `prompt` (KN edits one token, the paper's cloze answer)."""
    return tok(join(prompt, answer), add_special_tokens=False).input_ids[0]


def prompts(model, tok, request, cfg):
    """Token ids (1, n) of the bare prompt and of the prompt after each of `n_prefixes` model-written prefixes."""
    device = next(model.parameters()).device
    return [torch.tensor([encode_in_context(tok, prefix, request.prompt_text, request.subject)[0]], device=device)
            for prefix in context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_len)]


def _ids(model, tok, text):
    """Token ids (1, n) of `text` on the model's device."""
    return torch.tensor([tok(text, add_special_tokens=False).input_ids], device=next(model.parameters()).device)


@torch.no_grad()
def next_token(model, ids):
    """The model's own next token after `ids` (1, n)."""
    return int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())


def answers(model, tok, request):
    """(old, new) first-token ids: the old answer is target_true if given, else the model's own next token."""
    text = request.prompt_text
    old = first_token(tok, text, request.target_true) if request.target_true is not None else \
        next_token(model, _ids(model, tok, text))
    return old, first_token(tok, text, request.target_new)


def prompt_scores(model, ids_list, answer, layers, cfg, attribute=attribution):
    """Attribution of every searched neuron for P(answer | each prompt): (n_prompts, len(layers), d_mlp)."""
    return torch.stack([attribute(model, ids, layers, next_token_prob(answer), steps=cfg.ig_steps,
                                  start=ids.shape[1] - 1, rule="right") for ids in ids_list])


def _shares(share):
    """p, then p lowered in steps of 0.05 down to 0 (the authors' code, for facts with too few neurons)."""
    while share > 0:
        yield share
        share = round(share - SHARE_STEP, 6)
    yield 0.0


def select_neurons(scores, layers, cfg, exclude=frozenset()):
    """Knowledge neurons from per-prompt scores (P, L, d), none of `exclude`: [(layer, index)] and the p used."""
    top = scores.amax((1, 2), keepdim=True)
    coarse = (scores > cfg.threshold * top) & (top > 0)            # per prompt: attribution > t·max
    for layer, i in exclude:
        coarse[:, layers.index(layer), i] = False
    counts, total = coarse.sum(0), scores.sum(0)
    for p in _shares(cfg.share):
        keep = counts > p * len(scores)                            # in more than p of the prompts
        if int(keep.sum()) >= cfg.min_neurons:
            break
    where = keep.nonzero().tolist()
    where.sort(key=lambda li: (-int(counts[li[0], li[1]]), -float(total[li[0], li[1]])))
    return [(layers[l], i) for l, i in where[:cfg.max_neurons]], p


def reference_select(scores, layers, cfg, exclude=frozenset()):
    """select_neurons in plain code: a set of coarse neurons per prompt, counted, p lowered until enough."""
    sets = []
    for one_prompt in scores.tolist():
        best = max(max(row) for row in one_prompt)
        sets.append({(layers[l], i) for l, row in enumerate(one_prompt) for i, s in enumerate(row)
                     if best > 0 and s > cfg.threshold * best and (layers[l], i) not in exclude})
    counts = Counter(n for s in sets for n in s)
    total = {(layers[l], i): float(scores[:, l, i].sum()) for l in range(len(layers)) for i in range(scores.shape[2])}
    for p in _shares(cfg.share):
        kept = [n for n, c in counts.items() if c > p * len(sets)]
        if len(kept) >= cfg.min_neurons:
            break
    kept.sort(key=lambda n: (-counts[n], -total[n]))
    return kept[:cfg.max_neurons], p


def relation_neurons(model, tok, request, layers, cfg, attribute=attribution, select=select_neurons):
    """Neurons of the relation, not of the fact: knowledge neurons of more than `relation_share` of its other facts.

    The other facts are the request's template with `relation_subjects`, each answered by the model; their neurons
    come from the bare prompt alone (the paper locates each of them on all its paraphrases).
    """
    others = [s for s in cfg.relation_subjects if s != request.subject]
    counts = Counter()
    for subject in others:
        ids = _ids(model, tok, request.template.replace("{}", subject))
        counts.update(select(prompt_scores(model, [ids], next_token(model, ids), layers, cfg, attribute),
                             layers, cfg)[0])
    return frozenset(n for n, c in counts.items() if c > cfg.relation_share * len(others))


@torch.no_grad()
def activations(model, ids, neurons):
    """Each neuron's activation a_i at the last token of `ids` (its sign decides which way v_i pushes)."""
    names = {layer: module_name(model, "mlp_out", layer) for layer, _ in neurons}
    with record(model, sorted(set(names.values())), what="input") as store:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return [float(store[names[layer]][0, -1, i]) for layer, i in neurons]


@torch.no_grad()
def update_values(model, neurons, old, new, cfg, signs=None):
    """v_i ← v_i − λ1·E[y_old] + λ2·E[y_new] for each knowledge neuron (the paper's "updating facts").

    `signs` (the `signed` option): the change is multiplied by the sign of the neuron's activation.
    """
    E = model.get_output_embeddings().weight
    e_old, e_new = E[old].float(), E[new].float()
    for n, (layer, i) in enumerate(neurons):
        W = as_out_in(model, layer_module(model, "mlp_out", layer).weight)   # (d_model, d_mlp): column i is v_i
        v = W[:, i].float()
        l1, l2 = cfg.lambda1, cfg.lambda2
        if cfg.scale_by_value_norm:   # the authors' code: each embedding rescaled to the value's norm first
            l1, l2 = l1 * v.norm() / e_old.norm(), l2 * v.norm() / e_new.norm()
        sign = 1.0 if signs is None else signs[n]
        W[:, i] = (v + sign * (l2 * e_new - l1 * e_old)).to(W.dtype)


def locate(model, tok, request, cfg=Config(), attribute=attribution, select=select_neurons):
    """One request's knowledge neurons: a dict with the neurons, p used, the answers' ids and per-prompt counts."""
    layers = search_layers(model, cfg)
    old, new = answers(model, tok, request)
    ids_list = prompts(model, tok, request, cfg)
    scores = prompt_scores(model, ids_list, old, layers, cfg, attribute)
    relation = relation_neurons(model, tok, request, layers, cfg, attribute, select)
    neurons, share = select(scores, layers, cfg, relation)
    return {"neurons": neurons, "share": share, "old_token": old, "new_token": new, "n_prompts": len(ids_list),
            "attribution": [float(scores[:, layers.index(l), i].mean()) for l, i in neurons],
            "activation": activations(model, ids_list[0], neurons) if neurons else [],
            "relation_neurons": sorted(relation),
            "coarse_per_prompt": [int((s > cfg.threshold * s.max()).sum()) for s in scores]}


def _edit(model, tok, requests, cfg, attribute, select):
    """Locate then update, request after request (a later one sees the earlier edits); the info of the edit."""
    found = []
    for request in tqdm(requests, desc="KN", disable=not cfg.progress):
        where = locate(model, tok, request, cfg, attribute, select)
        signs = [1.0 if a >= 0 else -1.0 for a in where["activation"]] if cfg.signed else None
        update_values(model, where["neurons"], where["old_token"], where["new_token"], cfg, signs)
        found.append(where)
    neurons = [n for f in found for n in f["neurons"]]
    changed = sorted({mlp_out_weight_name(model, layer) for layer, _ in neurons})
    return {"neurons": neurons, "requests": found, "changed": changed, "columns_changed": len(set(neurons))}


def apply(model, tok, requests, cfg):
    """Locate each fact's knowledge neurons by integrated gradients and rewrite their value vectors."""
    return {"info": _edit(model, tok, requests, cfg, attribution, select_neurons)}


def reference_edit(model, tok, requests, cfg=Config()):
    """KN in plain code, editing `model` in place: the plain attribution and selection; returns apply's info."""
    return _edit(model, tok, as_request_list(requests), cfg, reference_attribution, reference_select)
