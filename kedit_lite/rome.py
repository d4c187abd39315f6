"""ROME: Rank-One Model Editing (Meng et al. 2022), chapter 5 (秩一模型编辑).

The MLP's down projection W is a key–value memory: the key k (its input at the subject's last token) retrieves
the value W k. ROME picks k* (keys_values.compute_keys) and a better value v* (keys_values.compute_deltas), then
solves   min ‖Ŵ K − W K‖  subject to  Ŵ k* = v*   (K: all other keys; C = K Kᵀ/n their second moment)
in closed form:   Ŵ = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*).

Named options (chapter 5 shows each): `consistent_keys=True` (r-ROME, Gupta et al. 2024) uses the prefix-averaged
k* everywhere, so Ŵ k* = v* holds exactly; `bare_key=True` adds the bare prompt's key as a second constraint (its
key sits at the attention sink when the prompt starts with the subject), still a rank-one edit; `wordings` (our
addition) also asks v* to make the target follow relation-free sentences about the subject, so the edit carries
over to paraphrases; `wordings=()` is ROME's published objective. What was measured while choosing the defaults
is in book/results/tuning_history.md.
"""
import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import as_out_in, check_layer, get_module, layer_module, mlp_out_weight_name, num_layers
from .keys_values import ASSOCIATION_WORDINGS, compute_deltas, compute_keys, context_prefixes
from .requests import EditError
from .stats import DEFAULT_N_TOKENS, second_moment

# SmolLM2: chosen on CounterFact train (see above, and chapter 5); ROME's published layers for its models.
DEFAULT_LAYER = {"SmolLM2-135M-Instruct": 8, "gpt2-xl": 17, "gpt2": 5, "EleutherAI/gpt-j-6b": 5, "gpt-j-6b": 5}
_COVARIANCES = {}   # (id of E[kkᵀ], its version, mom2_weight) -> (E[kkᵀ], C)
_FACTOR = []        # [C, C._version, its Cholesky factor]: one C serves every edit of a run


def default_layer(model):
    """The table entry for this model, else a layer at ~1/4 depth (where factual recall peaks in most LMs)."""
    from .models import loaded_name
    return DEFAULT_LAYER.get(loaded_name(model), max(0, num_layers(model) // 4))


def _layer(model, layer):
    layer = default_layer(model) if layer is None else layer
    try:
        return check_layer(model, layer)
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def _positive(name, value, integer=False, allow_zero=False):
    if integer:
        return checks.integer(name, value, 0 if allow_zero else 1)
    return checks.number(name, value, 0, open_low=not allow_zero)


def check_hparams(steps=20, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_factor=4.0, n_prefixes=2,
                  prefix_len=5, mom2_weight=10.0, mom2_n_tokens=DEFAULT_N_TOKENS, mom2_source="sample",
                  mom2_adjustment=True, consistent_keys=True, bare_key=True, stop_loss=5e-2,
                  wordings=ASSOCIATION_WORDINGS, **_):
    """Validate the shared ROME/MEMIT hyperparameters with errors that name the field."""
    _positive("steps", steps, integer=True)
    _positive("stop_loss", stop_loss, allow_zero=True)
    checks.learning_rate(lr)
    _positive("kl_factor", kl_factor, allow_zero=True)
    _positive("weight_decay", weight_decay, allow_zero=True)
    _positive("clamp_factor", clamp_factor)
    _positive("n_prefixes", n_prefixes, integer=True, allow_zero=True)
    _positive("prefix_len", prefix_len, integer=True)
    _positive("mom2_weight", mom2_weight, allow_zero=True)
    _positive("mom2_n_tokens", mom2_n_tokens, integer=True)
    texts_ok = isinstance(mom2_source, (list, tuple)) and mom2_source and all(
        isinstance(t, str) and t.strip() for t in mom2_source)
    if not (mom2_source in ("sample", "wikitext") or texts_ok):
        raise EditError(f"mom2_source: expected 'sample', 'wikitext' or a list of non-empty texts, got {mom2_source!r}")
    for name, value in (("mom2_adjustment", mom2_adjustment), ("consistent_keys", consistent_keys),
                        ("bare_key", bare_key)):
        if not isinstance(value, bool):
            raise EditError(f"{name}: expected True or False, got {value!r}")
    if not (isinstance(wordings, (list, tuple)) and all(isinstance(w, str) and w.count("{}") == 1 and w.strip() != "{}"
                                                        for w in wordings)):
        raise EditError(f"wordings: expected a list of sentences, each with one '{{}}' where the subject goes "
                        f"(e.g. ['{{}} is associated with']), or [] for ROME's own objective; got {wordings!r}")


def touched_parameters(model, requests, layer=None, **hparams):
    """ROME changes one matrix: the MLP down projection of `layer`."""
    check_hparams(**hparams)
    return [mlp_out_weight_name(model, _layer(model, layer))]


def covariance(model, tok, layer, mom2_weight=10.0, mom2_n_tokens=DEFAULT_N_TOKENS, mom2_source="sample",
               mom2_adjustment=True, progress=False):
    """C = mom2_weight · E[kkᵀ]/mean-eigenvalue + I (float32), or I when the statistics are switched off."""
    d_k = as_out_in(model, layer_module(model, "mlp_out", layer).weight).shape[1]
    device = next(model.parameters()).device
    eye = torch.eye(d_k, device=device)
    if not mom2_adjustment or mom2_weight == 0:
        return eye
    mom2 = second_moment(model, tok, layer, n_tokens=mom2_n_tokens, source=mom2_source, progress=progress)
    key = (id(mom2), mom2._version, float(mom2_weight))
    if key not in _COVARIANCES:      # the same C object for every edit, so solve_c factorises it only once
        _COVARIANCES.clear()
        _COVARIANCES[key] = (mom2, mom2_weight * mom2 / (mom2.trace() / d_k) + eye)  # holding mom2 keeps its id
    return _COVARIANCES[key][1]


def solve_c(C, x):
    """C⁻¹x for a symmetric positive definite C, via a Cholesky factor kept while the same C is passed again."""
    if not (_FACTOR and _FACTOR[0] is C and _FACTOR[1] == C._version):
        factor, info = torch.linalg.cholesky_ex(C)
        _FACTOR[:] = [C, C._version, factor if info.item() == 0 else None]   # None: not SPD, solve directly
    factor = _FACTOR[2]
    if factor is None:
        return torch.linalg.solve(C, x)
    return torch.cholesky_solve(x.unsqueeze(-1) if x.dim() == 1 else x, factor).reshape(x.shape)


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


def apply(model, tok, requests, layer=None, steps=20, lr=1.0, kl_factor=0.0625, weight_decay=0.5, clamp_factor=4.0,
          n_prefixes=1, prefix_len=5, mom2_weight=10.0, mom2_n_tokens=DEFAULT_N_TOKENS, mom2_source="sample",
          mom2_adjustment=True, consistent_keys=True, bare_key=True, stop_loss=0.1, wordings=ASSOCIATION_WORDINGS,
          progress=False):
    """Edit the requests one after another, each with its own rank-one update of the same matrix."""
    layer = _layer(model, layer)
    check_hparams(steps, lr, kl_factor, weight_decay, clamp_factor, n_prefixes, prefix_len, mom2_weight,
                  mom2_n_tokens, mom2_source, mom2_adjustment, consistent_keys, bare_key, stop_loss, wordings)
    weight = get_module(model, mlp_out_weight_name(model, layer))
    W = as_out_in(model, weight)                       # a view: updating it updates the model (Conv1D too)
    C = covariance(model, tok, layer, mom2_weight, mom2_n_tokens, mom2_source, mom2_adjustment, progress)
    prefixes = context_prefixes(model, tok, n_prefixes, prefix_len)
    info = {"layer": layer, "prefixes": prefixes, "losses": [], "delta_norm": [], "update_norm": [], "k_star": [],
            "v_star": []}
    for req in tqdm(requests, desc="ROME", disable=not progress or len(requests) == 1):
        k_star = compute_keys(model, tok, [req], [layer], prefixes)[layer][0]
        # r-ROME: the key in W k and in the denominator is the same averaged k*; the original used the bare prompt's
        k_num = k_star if consistent_keys else compute_keys(model, tok, [req], [layer], [""])[layer][0]
        delta, history = compute_deltas(model, tok, [req], layer, prefixes, steps, lr, kl_factor, weight_decay,
                                        clamp_factor, stop_loss, wordings=wordings)
        W32 = W.detach().float()
        v_star = W32 @ k_num + delta[0]                 # v* = v_old + δ (the bias, if any, cancels out)
        update = rank_one_update(W32, C, k_star, v_star, k_num)  # C⁻¹k* always uses the averaged key
        if bare_key and consistent_keys:  # (the original ROME had no such constraint: keep its update as it was)
            k_bare = compute_keys(model, tok, [req], [layer], [""])[layer][0]
            if _c_cosine(C, k_star, k_bare) < 0.99:  # a key of its own: give it the same δ
                K = torch.stack([k_star, k_bare], 1)
                update = constrained_update(W32, C, K, torch.stack([v_star, W32 @ k_bare + delta[0]], 1))
        with torch.no_grad():
            W.add_(update.to(W.dtype))
        info["k_star"].append(k_star)
        info["v_star"].append(v_star)
        info["losses"].append(history[0])
        info["delta_norm"].append(delta[0].norm().item())
        info["update_norm"].append(update.norm().item())
    return {"info": info}
