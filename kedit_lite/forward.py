"""Forward passes that read hidden states rather than logits, shared by the methods and the statistics.

ROME's keys, MEMIT's residuals (chapter 5) and the second moments E[kkᵀ] all read a module partway up the
model: these helpers run the body without the vocabulary head, and stop once the wanted modules have run.
`split_below` records one layer's input and the blocks below it, for methods that train at that layer.
"""
import torch

from .adapters import module_name
from .hooks import record, stop_after


def hidden_states(model, ids, mask):
    """Forward pass without the full-vocabulary head (we read hidden states, never logits)."""
    return model.base_model(input_ids=ids, attention_mask=mask)


def run_until(model, ids, mask, paths):
    """Forward pass that stops as soon as every module in `paths` has run (the layers above are not needed)."""
    with stop_after(model, paths):
        hidden_states(model, ids, mask)


@torch.no_grad()
def split_below(model, batch, layer, kind="mlp"):
    """One full forward: the input of `layer`'s `kind` module (B, S, d) and the outputs of the blocks below it.

    Methods that train at one layer (T-Patcher, GRACE, CaliNET) replay those blocks rather than rerun them.
    """
    below = [module_name(model, "layer", j) for j in range(layer)]
    name = module_name(model, kind, layer)
    with record(model, below, whole=True) as fixed, record(model, name, what="input") as seen:
        model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return seen[name].float(), dict(fixed)
