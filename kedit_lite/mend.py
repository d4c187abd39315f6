"""MEND (chapter 6): a small network that learns how to edit (人工智能学习如何编辑), Mitchell et al. 2022.

The gradient of a linear layer W (out x in) on a sequence is a sum of rank-one terms, ∇W = Σ_t δ_t x_tᵀ
(x_t: the layer's input at token t, δ_t: the loss gradient at its output). MEND never looks at the full
matrix: a small editor network maps each pair (x_t, δ_t) -> (x̃_t, δ̃_t), and the edit is
Δ = -α_ℓ Σ_t δ̃_t x̃_tᵀ with a learned step size α_ℓ per edited matrix. The editor is trained by
meta-learning with the base model frozen: apply the edit (functionally), then
loss = NLL(target_new | edit prompt, rephrase) + c_loc · KL(pre-edit || post-edit on unrelated prompts).

    python -m kedit_lite.mend train --steps 600 --out kedit_lite/checkpoints/mend_smollm2.safetensors
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import checks
from .adapters import as_out_in, get_adapter, get_module, module_name, num_layers
from .hooks import patch, record, replay
from .models import model_name
from .requests import EditError
from .tokens import encode_pairs

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "mend_smollm2.safetensors"
_LOADED = {}  # resolved path -> (mtime, MENDEditor): loading once makes each edit one forward/backward


# ---------------------------------------------------------------- which weights MEND edits (chapter 6)

def edited_parameters(model, n_layers=3):
    """Names of the MLP weights of the last `n_layers` blocks (inputs projections and the output projection)."""
    a, n = get_adapter(model), num_layers(model)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= n:
        raise EditError(f"n_layers: expected an integer from 1 to {n}, got {n_layers!r}")
    paths = list(a.mlp_in) + [a.mlp_out]
    return [p.format(layer) + ".weight" for layer in range(n - n_layers, n) for p in paths]


def unedited_blocks(model, names):
    """Names of the blocks below the first one holding an edited weight (their outputs do not change)."""
    blocks = [module_name(model, "layer", j) for j in range(num_layers(model))]
    first = min(j for j, b in enumerate(blocks) for n in names if n.startswith(b + "."))
    return blocks[:first]


def weight_shape(model, name):
    """(out, in) of a projection weight, whatever its storage orientation."""
    return tuple(as_out_in(model, get_module(model, name)).shape)


def module_of(name):
    """'model.layers.3.mlp.down_proj.weight' -> 'model.layers.3.mlp.down_proj'."""
    return name.rsplit(".", 1)[0]


# ---------------------------------------------------------------- the rank-one gradient pieces (chapter 6)

def answer_logits(model, batch):
    """Logits at the answer positions only, (n_answer_tokens, vocab): the full-vocabulary head is costly."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["answer_mask"]])


def _row_nll(logits, batch):
    """Per-row mean NLL of the answer tokens, from answer_logits (a sum of these gives each row its own gradient)."""
    m = batch["answer_mask"]
    tok_nll = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][m], reduction="none")
    rows = m.nonzero()[:, 0]
    return torch.zeros(m.shape[0], device=tok_nll.device).index_add(0, rows, tok_nll) / m.sum(1).clamp(min=1)


def gradient_factors(model, names, batch, rows=None):
    """One forward/backward: per edited weight, the inputs x (B, T, in) and output gradients δ (B, T, out).

    The loss is the answer NLL of `rows` (default: all rows), summed over rows, so row b's δ is its own.
    Also returns that forward's logits at the answer positions (the pre-edit model) and each row's NLL.
    """
    zeros, stack = {}, []

    def add_leaf(name):
        def fn(out):  # out + 0: a leaf we can differentiate against without touching the (frozen) weights
            zeros[name] = torch.zeros_like(out, dtype=torch.float32, requires_grad=True)
            return out + zeros[name].to(out.dtype)
        return fn
    with torch.enable_grad(), record(model, [module_of(n) for n in names], what="input") as xs:
        for n in names:
            stack.append(patch(model, module_of(n), add_leaf(n)))
            stack[-1].__enter__()
        try:
            logits = answer_logits(model, batch)
        finally:
            for ctx in reversed(stack):
                ctx.__exit__(None, None, None)
        nll = _row_nll(logits, batch)
        loss = (nll if rows is None else nll[rows]).sum()
        grads = torch.autograd.grad(loss, [zeros[n] for n in names])
    x = {n: xs[module_of(n)].float() for n in names}
    delta = {n: g.float() for n, g in zip(names, grads)}
    return x, delta, logits.detach(), nll.detach()


@contextmanager
def apply_deltas(model, deltas, row_index=None):
    """Run the model as if W ← W + Δ for each edited weight, keeping the graph to Δ (functional edit).

    deltas: {name: (E, out, in)}; row b of the batch uses edit row_index[b] (default: E must be 1).
    Adding x Δᵀ to the module's output equals using W + Δ, and works for Linear and GPT-2's Conv1D alike.
    """
    handles = []
    for name, d in deltas.items():
        mod = get_module(model, module_of(name))

        def hook(m, inputs, out, d=d):
            x = inputs[0]
            dd = d[row_index] if row_index is not None else d.expand(x.shape[0], -1, -1)
            return out + torch.einsum("bti,boi->bto", x.float(), dd).to(out.dtype)
        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the editor network (chapter 6)

class RunningNorm(nn.Module):
    """Normalise features with running mean/std (Welford), updated only while training."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x):
        """Merge a (N, dim) batch into the statistics (Chan et al.'s parallel Welford)."""
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        diff = mean - self.mean
        self.m2 += var * n + diff ** 2 * self.count * n / total
        self.mean += diff * n / total
        self.count.copy_(total)

    def forward(self, x):
        if self.count <= 1:
            return x - self.mean
        return (x - self.mean) / (self.m2 / self.count).sqrt().clamp(min=1e-8)


class LowRankBlock(nn.Module):
    """h = z + s_ℓ ⊙ U relu(V z + b) + o_ℓ : residual, low-rank, identity at initialisation (U = 0)."""

    def __init__(self, dim, rank, n_slots):
        super().__init__()
        self.V = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.V)
        self.b = nn.Parameter(torch.zeros(rank))
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.scale = nn.Parameter(torch.ones(n_slots, dim))   # per-layer scale and shift: the network is
        self.shift = nn.Parameter(torch.zeros(n_slots, dim))  # shared across layers of the same shape

    def forward(self, z, slot):
        return z + self.scale[slot] * (torch.relu(z @ self.V.T + self.b) @ self.U.T) + self.shift[slot]


class GradientTransform(nn.Module):
    """(x, δ) -> (x̃, δ̃) for every weight of one shape (out, in): normalise, concatenate, two low-rank blocks."""

    def __init__(self, d_out, d_in, rank, n_slots):
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.norm_x, self.norm_d = RunningNorm(d_in), RunningNorm(d_out)
        self.blocks = nn.ModuleList([LowRankBlock(d_in + d_out, rank, n_slots) for _ in range(2)])

    def forward(self, x, delta, slot):
        z = torch.cat([self.norm_x(x), self.norm_d(delta)], dim=-1)
        for block in self.blocks:
            z = block(z, slot)
        return z[..., :self.d_in], z[..., self.d_in:]


def _shape_key(shape):
    return f"{shape[0]}x{shape[1]}"


class MENDEditor(nn.Module):
    """One GradientTransform per weight shape, plus a learned step size per edited weight (chapter 6)."""

    def __init__(self, names, shapes, rank=128, lr_init=1e-4, meta=None):
        super().__init__()
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.rank, self.meta = rank, dict(meta or {})
        keys = [_shape_key(s) for s in self.shapes]
        self.slots = [keys[:i].count(k) for i, k in enumerate(keys)]
        self.transforms = nn.ModuleDict({k: GradientTransform(*s, rank, keys.count(k))
                                         for k, s in dict(zip(keys, self.shapes)).items()})
        self.log_lr = nn.Parameter(torch.full((len(self.names),), math.log(lr_init)))

    @classmethod
    def for_model(cls, model, n_layers=3, rank=128, lr_init=1e-4):
        """A fresh (identity-initialised) editor for the last `n_layers` MLPs of `model`."""
        names = edited_parameters(model, n_layers)
        meta = {"model": model_name(model), "model_type": model.config.model_type, "n_layers": n_layers}
        return cls(names, [weight_shape(model, n) for n in names], rank, lr_init, meta)

    def update_stats(self, x, delta, mask):
        """Add this batch's real tokens to the running statistics (training only)."""
        for i, name in enumerate(self.names):
            t = self.transforms[_shape_key(self.shapes[i])]
            t.norm_x.update(x[name][mask])
            t.norm_d.update(delta[name][mask])

    def forward(self, x, delta, mask):
        """Edits {name: Δ (B, out, in)}: Δ_b = -α Σ_t δ̃_bt x̃_btᵀ over the real tokens (mask: (B, T))."""
        out = {}
        for i, name in enumerate(self.names):
            t = self.transforms[_shape_key(self.shapes[i])]
            xt, dt = t(x[name], delta[name], self.slots[i])
            dt = dt * mask.unsqueeze(-1).to(dt.dtype)
            out[name] = -self.log_lr[i].exp() * torch.einsum("bto,bti->boi", dt, xt)
        return out

    def check_model(self, model):
        """Refuse a model this editor was not trained for (other name, architecture or shapes)."""
        want, got = self.meta.get("model"), model_name(model)
        if want != got or self.meta.get("model_type") != model.config.model_type:
            raise EditError(f"checkpoint: this MEND editor was trained for {want!r} ({self.meta.get('model_type')}), "
                            f"not {got!r} ({model.config.model_type}); train one for this model with "
                            "`python -m kedit_lite.mend train --model ...` and pass checkpoint=<its path>")
        params = dict(model.named_parameters())
        for name, shape in zip(self.names, self.shapes):
            if name not in params or weight_shape(model, name) != shape:
                raise EditError(f"checkpoint: the editor expects weight {name} of shape {shape}, which this model "
                                "lacks; train an editor for this model (python -m kedit_lite.mend train)")


# ---------------------------------------------------------------- checkpoints: safetensors only

def save_editor(editor, path, extra=None):
    """Write the editor's tensors as safetensors, with model name, architecture and edited weights in metadata."""
    from safetensors.torch import save_file
    meta = {"format": "pt", "kedit_mend": json.dumps({**editor.meta, "names": editor.names,
                                                      "shapes": [list(s) for s in editor.shapes],
                                                      "rank": editor.rank, **(extra or {})})}
    state = {k: v.detach().float().cpu().contiguous() for k, v in editor.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_editor(path):
    """Read an editor written by save_editor (no pickle involved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise EditError(f"checkpoint: {path} does not exist; pass the path of a MEND checkpoint or train one with "
                        "`python -m kedit_lite.mend train --out <path>`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kedit_mend")
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for a file it cannot read)
        raise EditError(f"checkpoint: {path} is not a safetensors file ({type(err).__name__}: {err}); pass a MEND "
                        "checkpoint written by `python -m kedit_lite.mend train --out <path>`") from err
    if raw is None:
        raise EditError(f"checkpoint: {path} is not a kedit_lite MEND checkpoint (no 'kedit_mend' metadata)")
    meta = json.loads(raw)
    names, shapes, rank = meta.pop("names"), meta.pop("shapes"), meta.pop("rank")
    editor = MENDEditor(names, shapes, rank, meta=meta)
    editor.load_state_dict(load_file(str(path)))
    return editor.eval()


def get_editor(checkpoint=None):
    """The editor to use: an in-memory MENDEditor, or a checkpoint path (default: the shipped one), cached."""
    if isinstance(checkpoint, MENDEditor):
        return checkpoint
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise EditError(f"checkpoint: expected a path or a MENDEditor, got {type(checkpoint).__name__}")
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    key = str(path.resolve())
    mtime = path.stat().st_mtime if path.exists() else None
    if key not in _LOADED or _LOADED[key][0] != mtime:
        _LOADED[key] = (mtime, load_editor(path))
    return _LOADED[key][1]


# ---------------------------------------------------------------- the method protocol (editing.py)

def _check_scale(scale):
    checks.number("scale", scale, 0, open_low=True, desc="a positive number multiplying the learned step sizes "
                  "(1.0 = as trained)")


def touched_parameters(model, requests, checkpoint=None, scale=1.0):
    """The weights MEND changes: the editor's weights, after checking it was trained for this model."""
    _check_scale(scale)
    editor = get_editor(checkpoint)
    editor.check_model(model)
    return list(editor.names)


@torch.no_grad()
def apply(model, tok, requests, checkpoint=None, scale=1.0):
    """One forward/backward on the edit prompts, the editor maps the gradient factors to Δ, add Δ in place.

    `scale` multiplies the learned step sizes: above 1 trades locality for reliability (chapter 6 measures it).
    """
    editor = get_editor(checkpoint)
    editor.check_model(model)
    device = next(model.parameters()).device
    editor.to(device)
    batch = encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests], device)
    x, delta, _, nll = gradient_factors(model, editor.names, batch)
    deltas = editor(x, delta, batch["attention_mask"].bool())
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        w = as_out_in(model, params[name])
        w.add_((scale * d.sum(0)).to(w.dtype))  # several requests: their edits add up (MEND's batched editing)
    return {"info": {"parameters": list(editor.names), "pre_edit_nll": nll.tolist(),
                     "edit_norms": {n: round(d.sum(0).norm().item(), 4) for n, d in deltas.items()}}}


# ---------------------------------------------------------------- meta-training (chapter 6)

def _training_batch(tok, cases, device):
    """Rows: B edit prompts, B rephrases (-> target_new), B unrelated prompts (-> their own answer)."""
    reqs = [c.request for c in cases]
    prompts = [r.prompt_text for r in reqs] + [c.paraphrase[0].prompt for c in cases] + \
        [c.locality[0].prompt for c in cases]
    answers = [r.target_new for r in reqs] * 2 + [c.locality[0].answer for c in cases]
    return encode_pairs(tok, prompts, answers, device)


def meta_step(model, tok, editor, cases, c_loc=1.0, update_stats=True):
    """One meta-training step's losses: edit (NLL after the edit) and locality (KL before || after)."""
    device = next(model.parameters()).device
    B = len(cases)
    batch = _training_batch(tok, cases, device)
    rows = torch.arange(B, device=device)
    below = unedited_blocks(model, editor.names)
    with record(model, below, whole=True) as fixed:  # the blocks below the edit compute the same after it
        x, delta, pre_logits, _ = gradient_factors(model, editor.names, batch, rows=rows)
    mask = batch["attention_mask"][:B].bool()
    x, delta = {n: v[:B] for n, v in x.items()}, {n: v[:B] for n, v in delta.items()}
    if update_stats:
        editor.update_stats(x, delta, mask)
    deltas = editor(x, delta, mask)
    with apply_deltas(model, deltas, row_index=torch.arange(3 * B, device=device) % B), replay(model, dict(fixed)):
        post_logits = answer_logits(model, batch)
    edit_loss = _row_nll(post_logits, batch)[:2 * B].mean()
    unrelated = batch["answer_mask"].nonzero()[:, 0] >= 2 * B   # answer tokens of the unrelated rows
    pre = torch.log_softmax(pre_logits[unrelated].float(), -1)
    post = torch.log_softmax(post_logits[unrelated].float(), -1)
    loc_loss = (pre.exp() * (pre - post)).sum(-1).mean()
    return edit_loss, loc_loss


def train(model, tok, cases, steps=300, batch_size=4, c_loc=1.0, lr=1e-4, lr_lr=1e-2, rank=128, n_layers=3,
          lr_init=1e-4, seed=0, editor=None, log=None, max_seconds=None):
    """Meta-train a MEND editor on `cases` (base model frozen); returns (editor, history of losses)."""
    usable = [c for c in cases if c.paraphrase and c.locality]
    if not usable:
        raise EditError("cases: need edit cases with a paraphrase and a locality probe (e.g. CounterFact train)")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    torch.manual_seed(seed)
    editor = (editor or MENDEditor.for_model(model, n_layers, rank, lr_init)).to(device).train()
    editor.check_model(model)
    opt = torch.optim.Adam([{"params": [p for n, p in editor.named_parameters() if n != "log_lr"], "lr": lr},
                            {"params": [editor.log_lr], "lr": lr_lr}])
    history, start = [], time.perf_counter()
    for step in range(steps):
        chunk = rng.sample(usable, min(batch_size, len(usable)))
        edit_loss, loc_loss = meta_step(model, tok, editor, chunk, c_loc)
        loss = edit_loss + c_loc * loc_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), 10.0)
        opt.step()
        history.append({"step": step + 1, "edit": edit_loss.item(), "loc": loc_loss.item(),
                        "seconds": time.perf_counter() - start})
        if log is not None:
            log(history[-1])
        if max_seconds is not None and history[-1]["seconds"] > max_seconds:
            break
    return editor.eval(), history


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kedit_lite.mend", description="Meta-train a MEND editor.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on CounterFact's train split and save a safetensors checkpoint")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--c-loc", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=3)
    p.add_argument("--lr-init", type=float, default=1e-4)
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training records")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps")
    p.add_argument("--resume", default=None, help="continue training from this checkpoint")
    p.add_argument("--lr-lr", type=float, default=1e-2, help="learning rate of the log step sizes")
    args = parser.parse_args(argv)
    from .data import load_counterfact
    from .models import load_model
    model, tok = load_model(args.model)
    cases = load_counterfact("train", n=args.n_train)
    cpu0 = time.process_time()
    editor = MENDEditor.for_model(model, args.n_layers, args.rank, args.lr_init)
    previous = None
    if args.resume:  # continue a run: start from its editor (statistics included); keep its record
        editor = load_editor(args.resume)
        editor.check_model(model)
        record_path = Path(args.resume).with_suffix(".json")
        previous = json.loads(record_path.read_text()) if record_path.exists() else None

    def log(row):
        if row["step"] % args.log_every == 0 or row["step"] == 1:
            print(f"step {row['step']:5d}  edit {row['edit']:.3f}  loc {row['loc']:.4f}  {row['seconds']:.0f}s "
                  f"cpu {time.process_time() - cpu0:.0f}s", flush=True)
        if args.save_every and row["step"] % args.save_every == 0:  # a usable checkpoint even if stopped early
            save_editor(editor, args.out, extra={"steps": row["step"], "c_loc": args.c_loc})
    editor, history = train(model, tok, cases, args.steps, args.batch_size, args.c_loc, args.lr, lr_lr=args.lr_lr,
                            seed=args.seed, editor=editor, log=log, max_seconds=args.max_seconds)
    tail = history[-50:]
    record_ = {"command": "python -m kedit_lite.mend " + " ".join(argv if argv is not None else sys.argv[1:]),
               "data": f"CounterFact train split via ke.load_counterfact('train'): {len(cases)} records",
               "hparams": {k: v for k, v in vars(args).items()
                           if k not in ("command", "out", "log_every", "save_every", "resume")},
               "steps_run": len(history), "wall_seconds": round(history[-1]["seconds"], 1),
               "cpu_seconds": round(time.process_time() - cpu0, 1), "torch_threads": torch.get_num_threads(),
               "first_losses": {"edit": history[0]["edit"], "loc": history[0]["loc"]},
               "final_losses_mean_last_50": {"edit": sum(h["edit"] for h in tail) / len(tail),
                                             "loc": sum(h["loc"] for h in tail) / len(tail)},
               "step_sizes": [round(v, 6) for v in editor.log_lr.exp().tolist()],
               "history_every_10": [h for h in history if h["step"] % 10 == 0], "resumed_from": previous}
    total = len(history) + (previous or {}).get("total_steps", (previous or {}).get("steps_run", 0))
    record_["total_steps"] = total
    record_["total_cpu_seconds"] = record_["cpu_seconds"] + (previous or {}).get(
        "total_cpu_seconds", (previous or {}).get("cpu_seconds", 0))
    save_editor(editor, args.out, extra={"steps": total, "c_loc": args.c_loc})
    Path(args.out).with_suffix(".json").write_text(json.dumps(record_, indent=1))
    print(json.dumps({k: v for k, v in record_.items() if k != "history_every_10"}, indent=1))


if __name__ == "__main__":
    _main()
