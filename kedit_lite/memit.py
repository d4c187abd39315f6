"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023), chapter 5.

Many facts in one update, spread over a range of MLP layers R = [l₁ … l_L] (the paper's algorithm 1):
1. z_i = h_i^L + δ_i for each fact: δ_i optimised at the output of the LAST layer of the range (the residual
   stream) with ROME's v* objective (keys_values); h_i^L is the residual there on the prompt.
2. For each layer l in R, in order: the keys K at l (averaged over prefixes, with the layers edited so far), the
   residual still missing at the last layer, spread over the layers left, R = (z − h^L) / (layers left), and
   the batched least-squares update   ΔW_l = R Kᵀ (λ·E[kkᵀ] + K Kᵀ)⁻¹   (λ: `mom2_update_weight`).
`Config()` is the published algorithm. Our options, off by default: `wordings`, `bare_key` (as in ROME),
`ridge` (a small multiple of I added to E[kkᵀ]) and, against interference between the facts of one batch,
`keep_shared`, `center_deltas` and `protect_subjects`; `IMPROVED` collects what we use. `mom2_adjustment=False`
replaces E[kkᵀ] by (mean ‖k‖²/d_k)·I, as in EasyEdit. `reference_edit` is algorithm 1 as plain, slow code.
"""
from dataclasses import dataclass

import torch

from . import checks
from .adapters import as_out_in, check_layer, get_module, mlp_out_weight_name, module_name, num_layers
from .keys_values import (ASSOCIATION_WORDINGS, ValueConfig, compute_deltas, compute_keys, context_prefixes,
                          read_at_subject, read_one, reference_key, reference_value, subject_start_keys)
from .requests import EditError
from .rome import default_layer
from .stats import StatsConfig, second_moments

N_LAYERS = 5  # MEMIT edits 5 (GPT-J) to 6 (GPT-2 XL) consecutive layers around the causal-tracing peak
WORDINGS = ASSOCIATION_WORDINGS[:3]   # ROME's first three wordings: all five cost time for little gain
# The last layer of the range, where measured (SmolLM2: layers 3-7, around the causal-tracing peak).
DEFAULT_LAST_LAYER = {"SmolLM2-135M-Instruct": 7}
IMPROVED = dict(wordings=WORDINGS, bare_key=True, ridge=0.1, n_prefixes=2)   # what we use (book/lab_notes.md)


def _check_layers(layers):
    """`layers` as a tuple of distinct ints (None stays None); the range is checked against the model later."""
    if layers is None:
        return None
    layers = [layers] if checks.is_integer(layers) else layers
    if not (isinstance(layers, (list, tuple)) and layers and all(checks.is_integer(x) for x in layers)):
        raise EditError(f"layers: expected an int or a non-empty list of ints, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise EditError(f"layers: {list(layers)} repeats a layer; list each layer once")
    return tuple(int(x) for x in layers)


def _check_subjects(other_subjects, protect_subjects):
    """other_subjects as a tuple of names, 'counterfact' or None (refused when protect_subjects needs some)."""
    names_ok = isinstance(other_subjects, (list, tuple)) and other_subjects and all(
        isinstance(s, str) and s.strip() for s in other_subjects)
    if not (other_subjects is None or other_subjects == "counterfact" or names_ok):
        raise EditError(f"other_subjects: expected a non-empty list of subject names or 'counterfact' (the "
                        f"subjects of 500 CounterFact train records), got {other_subjects!r}")
    if protect_subjects and other_subjects is None:
        raise EditError("other_subjects: protect_subjects needs subjects to protect: pass a list of names, or "
                        "'counterfact' for the subjects of 500 CounterFact train records")
    return tuple(other_subjects) if names_ok else other_subjects


@dataclass(frozen=True)
class Config(ValueConfig, StatsConfig):
    """MEMIT's hyperparameters: v*'s (ValueConfig), the statistics' (StatsConfig) and the batched update's."""
    layers: object = None              # an int or a list of ints; None: default_layers(model)
    clamp_factor: float = 0.75         # ‖δ‖ ≤ 0.75 ‖h^L‖: MEMIT's published clamp is relative to the residual
    mom2_update_weight: float = 1500.0  # λ, how much the other keys (E[kkᵀ]) weigh against the new ones
    bare_key: bool = False             # our option: the bare prompt's keys as extra rows
    ridge: float = 0.0                 # our option: + ridge · mean eigenvalue · I in E[kkᵀ]
    keep_shared: float = 1.0           # our option: the fraction of the batch's mean δ each fact keeps
    center_deltas: bool = False        # our option: optimise δ with a zero batch mean
    protect_subjects: float = 0.0      # our option: weight of other subjects' keys added to E[kkᵀ]
    other_subjects: object = None      # the subjects protect_subjects protects (names, or 'counterfact')
    chunk: int | None = None           # facts whose δ are optimised together (None: keys_values.CHUNK)
    progress: bool = False

    def __post_init__(self):
        """Check every field; a bad one raises EditError naming it."""
        ValueConfig.__post_init__(self)
        StatsConfig.__post_init__(self)
        object.__setattr__(self, "layers", _check_layers(self.layers))
        checks.number("mom2_update_weight", self.mom2_update_weight, 0, open_low=True)
        checks.number("ridge", self.ridge, 0)
        checks.number("keep_shared", self.keep_shared, 0, 1, hint="1 keeps MEMIT's δ as they are")
        checks.number("protect_subjects", self.protect_subjects, 0)
        object.__setattr__(self, "other_subjects", _check_subjects(self.other_subjects, self.protect_subjects))
        if self.chunk is not None:
            checks.integer("chunk", self.chunk, 1)
        for name in ("bare_key", "center_deltas", "progress"):
            checks.flag(name, getattr(self, name))

    @classmethod
    def improved(cls, **options):
        """Our configuration: MEMIT plus the wordings, the bare prompt's keys and a ridge."""
        return cls(**{**IMPROVED, **options})


def default_layers(model):
    """N_LAYERS consecutive layers ending at the table's layer, else two above the ROME layer (clipped)."""
    from .models import loaded_name
    n = num_layers(model)
    last = min(n - 1, DEFAULT_LAST_LAYER.get(loaded_name(model), default_layer(model) + 2))
    return list(range(max(0, last - N_LAYERS + 1), last + 1))


def resolve_layers(model, layers):
    """The layers checked against the model, sorted (None: default_layers)."""
    layers = default_layers(model) if layers is None else layers
    try:
        return sorted(check_layer(model, layer, "layers") for layer in layers)
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def check_requests(model, tok, requests, cfg):
    """center_deltas needs facts to share a part: a batch of two or more, in chunks of two or more."""
    if cfg.center_deltas and (len(requests) < 2 or (cfg.chunk or 2) < 2):
        raise EditError(f"center_deltas: needs a batch of 2 or more facts and chunk >= 2 (a fact alone has no "
                        f"shared part to leave out); got {len(requests)} facts, chunk {cfg.chunk}")


def touched_parameters(model, requests, cfg):
    """MEMIT changes the MLP down projection of every layer in the range."""
    return [mlp_out_weight_name(model, layer) for layer in resolve_layers(model, cfg.layers)]


def _protected_moments(model, tok, layers, other_subjects, requests):
    """{layer: E[kkᵀ]} over the keys of other subjects written alone (the batch's own subjects left out)."""
    if other_subjects == "counterfact":
        from .data import counterfact_subjects
        try:
            other_subjects = counterfact_subjects()
        except OSError as err:  # FileNotFoundError included: no local copy and no download
            raise EditError(f"other_subjects: 'counterfact' needs the CounterFact data ({err}); pass a list of "
                            f"names instead") from err
    editing = {r.subject for r in requests}
    names = [s for s in dict.fromkeys(other_subjects) if s not in editing]
    if not names:
        raise EditError("other_subjects: every name is a subject of this batch; pass other subjects to protect")
    keys = subject_start_keys(model, tok, layers, names)
    return {layer: k.T @ k / len(k) for layer, k in keys.items()}


def _priors(model, tok, requests, layers, cfg):
    """{layer: E[kkᵀ]} with our options (protected subjects, ridge) added; None without statistics."""
    if not cfg.mom2_adjustment:
        return None
    mom2 = second_moments(model, tok, layers, n_tokens=cfg.mom2_n_tokens, source=cfg.mom2_source,
                          progress=cfg.progress)
    protected = _protected_moments(model, tok, layers, cfg.other_subjects, requests) if cfg.protect_subjects else {}
    priors = {}
    for layer in layers:
        prior, d_k = mom2[layer], mom2[layer].shape[0]
        if protected:  # other subjects' keys at the start of a prompt, where neighbours sit (chapter 5)
            prior = prior + cfg.protect_subjects * prior.trace() / protected[layer].trace() * protected[layer]
        priors[layer] = prior + cfg.ridge * prior.trace() / d_k * torch.eye(d_k, device=prior.device)
    return priors


def _residual(model, tok, requests, layer):
    """h^L: the residual stream (block `layer`'s output) at each subject's last token, on the bare prompt."""
    return read_at_subject(model, tok, requests, [""], {"h": (module_name(model, "layer", layer), "output")})["h"]


def least_squares_update(K, R, prior, weight):
    """ΔW = R Kᵀ (λ·prior + K Kᵀ)⁻¹ with keys K (d_k × n) and residuals R (d × n) as columns (float64)."""
    K, R = K.double(), R.double()
    if prior is None:   # no statistics: a scaled identity (EasyEdit's mom2_adjustment=False)
        prior = torch.eye(K.shape[0], dtype=K.dtype, device=K.device) * K.pow(2).sum(0).mean() / K.shape[0]
    A = weight * prior.double() + K @ K.T
    return torch.linalg.solve(A, K @ R.T).T.float()       # A is symmetric: (A⁻¹ K Rᵀ)ᵀ = R Kᵀ A⁻¹


def apply(model, tok, requests, cfg):
    """Write all requests into the layers' down projections in one batched update per layer."""
    layers = resolve_layers(model, cfg.layers)
    prefixes = context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_len)
    priors = _priors(model, tok, requests, layers, cfg)
    last = layers[-1]
    deltas, history = compute_deltas(model, tok, requests, last, prefixes, cfg, chunk=cfg.chunk,
                                     center=cfg.center_deltas, norm_of="layer")
    deltas = deltas - (1 - cfg.keep_shared) * deltas.mean(0, keepdim=True)   # our option: 1 leaves δ as it is
    z = _residual(model, tok, requests, last) + deltas                        # z_i = h_i^L + δ_i
    contexts = [prefixes] + ([[""]] if cfg.bare_key else [])      # key rows per fact: averaged (+ the bare prompt's)
    info = {"layers": layers, "prefixes": prefixes, "losses": history, "deltas": deltas, "update_norm": {},
            "residual_norm": {}}
    for i, layer in enumerate(layers):
        K = torch.cat([compute_keys(model, tok, requests, [layer], c)[layer] for c in contexts])   # (rows, d_k)
        R = (z - _residual(model, tok, requests, last)) / (len(layers) - i)   # what is missing, over layers left
        update = least_squares_update(K.T, R.repeat(len(contexts), 1).T, None if priors is None else priors[layer],
                                      cfg.mom2_update_weight)
        W = as_out_in(model, get_module(model, mlp_out_weight_name(model, layer)))
        with torch.no_grad():
            W.add_(update.to(W.dtype))
        info["update_norm"][layer] = update.norm().item()
        info["residual_norm"][layer] = R.norm(dim=-1).mean().item()
    return {"info": info}


def reference_edit(model, tok, requests, cfg=Config()):
    """MEMIT's algorithm 1 as plain, slow code (one whole forward pass per prompt), applied to the model.

    Our options (bare_key, ridge, keep_shared, center_deltas, protect_subjects) are not part of it.
    Returns the δ, the layers and {layer: ΔW}.
    """
    if cfg.bare_key or cfg.ridge or cfg.keep_shared != 1 or cfg.center_deltas or cfg.protect_subjects:
        raise EditError("config: the reference implements MEMIT as published; leave bare_key, ridge, keep_shared, "
                        "center_deltas and protect_subjects at their defaults")
    layers = resolve_layers(model, cfg.layers)
    prefixes = context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_len)
    mom2 = second_moments(model, tok, layers, n_tokens=cfg.mom2_n_tokens, source=cfg.mom2_source,
                          progress=False) if cfg.mom2_adjustment else None
    last_block = module_name(model, "layer", layers[-1])
    h_last = lambda r: read_one(model, tok, "", r.prompt_text, r.subject, last_block)     # h_i^L
    deltas = [reference_value(model, tok, r, layers[-1], prefixes, cfg, norm_of="layer")[0] for r in requests]
    z = [h_last(r) + d for r, d in zip(requests, deltas)]                # line 1-4: z_i = h_i^L + δ_i
    updates = {}
    for i, layer in enumerate(layers):
        K = torch.stack([reference_key(model, tok, r, layer, prefixes) for r in requests], 1)     # k_i^l columns
        R = torch.stack([z_i - h_last(r) for z_i, r in zip(z, requests)], 1) / (len(layers) - i)  # r_i^l
        C0 = mom2[layer] if mom2 is not None else torch.eye(len(K), device=K.device) * K.pow(2).sum(0).mean() / len(K)
        A = cfg.mom2_update_weight * C0.double() + K.double() @ K.double().T
        updates[layer] = (R.double() @ K.double().T @ torch.linalg.inv(A)).float()      # ΔW = R Kᵀ (λC₀ + KKᵀ)⁻¹
        W = as_out_in(model, get_module(model, mlp_out_weight_name(model, layer)))
        with torch.no_grad():
            W.add_(updates[layer].to(W.dtype))                           # run layer l with the updated weights
    return {"deltas": torch.stack(deltas), "layers": layers, "updates": updates}
