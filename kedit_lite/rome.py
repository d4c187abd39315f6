"""ROME: Rank-One Model Editing (Meng et al. 2022), chapter 5 (秩一模型编辑).

The MLP's down projection W is a key–value memory: the key k (its input at the subject's last token) retrieves
the value W k. ROME picks k* (eq. 3) and a better value v* (eq. 4, keys_values), then solves
    min ‖Ŵ K − W K‖  subject to  Ŵ k* = v*   (K: all other keys; C = K Kᵀ/n their second moment)
in closed form (eq. 2):   Ŵ = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*).

`Config()` is ROME as its authors' code runs it (and EasyEdit), only the layer adapted to the model: the update
uses the bare prompt's key in W k and in the denominator, so Ŵ k_bare = v* but Ŵ k* ≠ v*. `consistent_keys=True`
is r-ROME's fix (Gupta et al. 2024): the averaged k* everywhere, as eq. 2 writes it. Our options, off by default
and together with r-ROME's fix in `IMPROVED`: `wordings` (relation-free sentences, so the edit carries over to
paraphrases) and `bare_key` (the bare prompt's key as a second constraint on top of k*, still rank one).
`reference_edit` is the algorithm as plain, slow code; the fast `apply` is tested equal to it.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import as_out_in, check_layer, get_module, layer_module, mlp_out_weight_name, num_layers
from .caches import Cache
from .keys_values import (ASSOCIATION_WORDINGS, ValueConfig, compute_deltas, compute_keys, context_prefixes,
                          reference_key, reference_value)
from .requests import EditError
from .stats import StatsConfig, second_moment

# SmolLM2: chosen on CounterFact train (chapter 5); ROME's published layers for its models.
DEFAULT_LAYER = {"SmolLM2-135M-Instruct": 8, "gpt2-xl": 17, "gpt2": 5, "EleutherAI/gpt-j-6b": 5, "gpt-j-6b": 5}
_COVARIANCES = Cache("ROME covariances")      # per model: (layer, mom2_weight) -> (E[kkᵀ], C)
_FACTORS = Cache("Cholesky factors", maxsize=1)   # the last C and its factor: one C serves every edit of a run


@dataclass(frozen=True)
class Config(ValueConfig, StatsConfig):
    """ROME's hyperparameters: v*'s (ValueConfig), the statistics' (StatsConfig) and the update's."""
    layer: int | None = None      # None: default_layer(model)
    mom2_weight: float = 10.0     # C = mom2_weight · E[kkᵀ]/mean eigenvalue + I (a ridge for few tokens)
    consistent_keys: bool = False  # True: r-ROME's fix (see the module docstring); False: the original code
    bare_key: bool = False         # our option (with consistent_keys): the bare prompt's key gets the same δ too
    progress: bool = False

    def __post_init__(self):
        """Check every field; a bad one raises EditError naming it."""
        ValueConfig.__post_init__(self)
        StatsConfig.__post_init__(self)
        if not (self.layer is None or checks.is_integer(self.layer)):   # its range is checked against the model
            raise EditError(f"layer: expected an integer layer index (or None for the default), got {self.layer!r}")
        checks.number("mom2_weight", self.mom2_weight, 0)
        for name in ("consistent_keys", "bare_key", "progress"):
            checks.flag(name, getattr(self, name))
        if self.bare_key and not self.consistent_keys:
            raise EditError("bare_key: needs consistent_keys=True (the original keys already constrain the bare "
                            "prompt's key alone); pass both, as rome.IMPROVED does")

    @classmethod
    def improved(cls, **options):
        """Our configuration (IMPROVED): r-ROME's keys plus the relation-free wordings and the bare prompt's key."""
        return cls(**{**IMPROVED, **options})


# Our configuration: r-ROME's consistent keys, our two options, and the v* settings tuned with them on
# CounterFact train (a faster Adam, one sampled prefix, an earlier stop; book/lab_notes.md).
IMPROVED = dict(consistent_keys=True, wordings=ASSOCIATION_WORDINGS, bare_key=True, lr=1.0, n_prefixes=1,
                stop_loss=0.1)


def default_layer(model):
    """The table entry for this model, else a layer at ~1/4 depth (where factual recall peaks in most LMs)."""
    from .models import loaded_name
    return DEFAULT_LAYER.get(loaded_name(model), max(0, num_layers(model) // 4))


def resolve_layer(model, layer):
    """`layer` checked against the model (None: its default layer)."""
    layer = default_layer(model) if layer is None else layer
    try:
        return check_layer(model, layer)
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def touched_parameters(model, requests, cfg):
    """ROME changes one matrix: the MLP down projection of the layer."""
    return [mlp_out_weight_name(model, resolve_layer(model, cfg.layer))]


def covariance(model, tok, layer, cfg=Config()):
    """C = mom2_weight · E[kkᵀ]/mean-eigenvalue + I (float32), or I when the statistics are switched off."""
    d_k = as_out_in(model, layer_module(model, "mlp_out", layer).weight).shape[1]
    eye = torch.eye(d_k, device=next(model.parameters()).device)
    if not cfg.mom2_adjustment or cfg.mom2_weight == 0:
        return eye
    mom2 = second_moment(model, tok, layer, n_tokens=cfg.mom2_n_tokens, source=cfg.mom2_source,
                         progress=cfg.progress)
    key = (layer, float(cfg.mom2_weight))
    held = _COVARIANCES.peek(key, owner=model)
    if held is None or held[0] is not mom2:   # the same C object for every edit, so solve_c factorises it once
        held = _COVARIANCES.put(key, (mom2, cfg.mom2_weight * mom2 / (mom2.trace() / d_k) + eye), owner=model)
    return held[1]


def solve_c(C, x):
    """C⁻¹x for a symmetric positive definite C, via a Cholesky factor kept while the same C is passed again."""
    held = _FACTORS.peek("last")
    if not (held and held[0] is C and held[1] == C._version):
        factor, info = torch.linalg.cholesky_ex(C)
        held = _FACTORS.put("last", (C, C._version, factor if info.item() == 0 else None))   # None: not SPD
    if held[2] is None:
        return torch.linalg.solve(C, x)
    return torch.cholesky_solve(x.unsqueeze(-1) if x.dim() == 1 else x, held[2]).reshape(x.shape)


def constrained_update(W, C, K, V):
    """ΔW with (W + ΔW) K = V exactly and least change on the other keys: (V − W K)(Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹.

    K: (d_k, m) keys as columns, V: (d_out, m) values. m = 1 is ROME's rank-one update (chapter 5).
    """
    U = solve_c(C, K)                                              # C⁻¹ K
    return (V - W @ K) @ torch.linalg.solve(K.T @ U, U.T)


def _c_cosine(C, a, b):
    """Cosine of two keys in the C⁻¹ inner product (1: the same key as far as the update can tell)."""
    Ca, Cb = solve_c(C, a), solve_c(C, b)
    return (a @ Cb / (a @ Ca * (b @ Cb)).sqrt()).item()


def rank_one_update(W, C, k, v, k_num=None):
    """The closed form of chapter 5: ΔW = Λ uᵀ with u = C⁻¹k and Λ = (v − W k)/(uᵀk), so (W + ΔW) k = v.

    `k_num` (default k) is the key used in W k and uᵀk; only the original ROME's k* mismatch passes another one.
    """
    k_num = k if k_num is None else k_num
    u = solve_c(C, k)
    return torch.outer((v - W @ k_num) / (u @ k_num), u)


def _bare_key(model, tok, req, layer):
    """The key of the bare prompt (no prefix) at `layer`."""
    return compute_keys(model, tok, [req], [layer], [""])[layer][0]


def _edit_one(model, tok, req, layer, W, C, prefixes, cfg):
    """k*, v*, δ's NLL history and ΔW for one request (W: float32 copy of the current weight)."""
    k_star = compute_keys(model, tok, [req], [layer], prefixes)[layer][0]
    # r-ROME: the key in W k and in the denominator is the same averaged k*; the original used the bare prompt's
    k_num = k_star if cfg.consistent_keys else _bare_key(model, tok, req, layer)
    delta, history = compute_deltas(model, tok, [req], layer, prefixes, cfg)
    v_star = W @ k_num + delta[0]                   # v* = v_old + δ (the bias, if any, cancels out)
    update = rank_one_update(W, C, k_star, v_star, k_num)  # C⁻¹k* always uses the averaged key
    if cfg.bare_key:   # (Config makes sure the keys are r-ROME's consistent ones)
        k_bare = _bare_key(model, tok, req, layer)
        if _c_cosine(C, k_star, k_bare) < 0.99:  # a key of its own: give it the same δ
            K = torch.stack([k_star, k_bare], 1)
            update = constrained_update(W, C, K, torch.stack([v_star, W @ k_bare + delta[0]], 1))
    return k_star, v_star, delta[0], history[0], update


def apply(model, tok, requests, cfg):
    """Edit the requests one after another, each with its own rank-one update of the same matrix."""
    layer = resolve_layer(model, cfg.layer)
    W = as_out_in(model, get_module(model, mlp_out_weight_name(model, layer)))   # a view (Conv1D too)
    C = covariance(model, tok, layer, cfg)
    prefixes = context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_len)
    info = {"layer": layer, "prefixes": prefixes, "losses": [], "delta": [], "delta_norm": [], "update_norm": [],
            "k_star": [], "v_star": []}
    for req in tqdm(requests, desc="ROME", disable=not cfg.progress or len(requests) == 1):
        k_star, v_star, delta, losses, update = _edit_one(model, tok, req, layer, W.detach().float(), C, prefixes,
                                                          cfg)
        with torch.no_grad():
            W.add_(update.to(W.dtype))
        info["k_star"].append(k_star)
        info["v_star"].append(v_star)
        info["losses"].append(losses)
        info["delta"].append(delta)
        info["delta_norm"].append(delta.norm().item())
        info["update_norm"].append(update.norm().item())
    return {"info": info}


def reference_edit(model, tok, request, cfg=Config()):
    """ROME as the paper writes it, for one request: k* (eq. 3), v* (eq. 4), Ŵ = W + Λ(C⁻¹k*)ᵀ (eq. 2), applied.

    Plain, slow and cache-free except for the inputs (the prefixes and C, the same as `apply` uses); `bare_key`
    is our option and not part of it. Returns k*, v*, δ, the NLL per step and ΔW.
    """
    if cfg.bare_key:
        raise EditError("bare_key: the reference implements ROME as published; pass bare_key=False")
    layer = resolve_layer(model, cfg.layer)
    W = as_out_in(model, get_module(model, mlp_out_weight_name(model, layer)))
    prefixes = context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_len)
    k_star = reference_key(model, tok, request, layer, prefixes)
    k_bare = reference_key(model, tok, request, layer, [""])
    k_num = k_star if cfg.consistent_keys else k_bare       # the original code's W k and denominator used k_bare
    delta, losses = reference_value(model, tok, request, layer, prefixes, cfg)
    W0 = W.detach().float()
    v_star = W0 @ k_num + delta                               # v* = v_old + δ
    u = torch.linalg.solve(covariance(model, tok, layer, cfg), k_star)   # C⁻¹k*
    update = torch.outer((v_star - W0 @ k_num) / (u @ k_num), u)        # eq. 2: Λ (C⁻¹k*)ᵀ
    with torch.no_grad():
        W.add_(update.to(W.dtype))
    return {"k_star": k_star, "v_star": v_star, "delta": delta, "losses": losses, "update": update}
