"""Adam with an L∞ bound on every weight change: the optimiser of FT-L (chapter 2) and of debiasing (chapter 8).

FT-L (Zhu et al. 2020) trains a few weights on the edit and, after every step, clamps each weight back into
[w0 - bound, w0 + bound]; the bound limits how far the edit can spill over onto other inputs. Debiasing (LSDM /
DAMA spirit) uses the same bounded update with its own loss, so both call `clamped_adam`.
"""
import torch
from tqdm.auto import tqdm


def clamped_adam(weights, loss_fn, steps, lr, bound=None, stop_below=None, desc=None):
    """Minimise loss_fn() over `weights` with Adam, each |w - w0| <= bound after every step; returns the losses.

    Stops early once the loss is below `stop_below`; `desc` shows a progress bar with that label.
    """
    originals = [w.detach().clone() for w in weights]
    optimizer = torch.optim.Adam(weights, lr=lr)
    losses = []
    with torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        try:
            for _ in tqdm(range(steps), desc=desc, disable=desc is None):
                optimizer.zero_grad()
                loss = loss_fn()
                losses.append(loss.item())
                if stop_below is not None and losses[-1] < stop_below:
                    break
                loss.backward()
                optimizer.step()
                if bound is not None:
                    clamp_to(weights, originals, bound)
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
    return losses


@torch.no_grad()
def clamp_to(weights, originals, bound):
    """Clamp each weight into [original - bound, original + bound] in place (the L∞ ball around it)."""
    for w, w0 in zip(weights, originals):
        w.copy_(torch.clamp(w, w0 - bound, w0 + bound))
