"""Forward passes that read hidden states rather than logits, shared by the methods and the statistics.

ROME's keys, MEMIT's residuals (chapter 5) and the second moments E[kkᵀ] all read a module partway up the
model: these helpers run the body without the vocabulary head, and stop once the wanted modules have run.
"""
from .hooks import stop_after


def hidden_states(model, ids, mask):
    """Forward pass without the full-vocabulary head (we read hidden states, never logits)."""
    return model.base_model(input_ids=ids, attention_mask=mask)


def run_until(model, ids, mask, paths):
    """Forward pass that stops as soon as every module in `paths` has run (the layers above are not needed)."""
    with stop_after(model, paths):
        hidden_states(model, ids, mask)
