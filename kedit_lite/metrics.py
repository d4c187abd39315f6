"""The metrics of an edit (chapter 2): reliability, generalization (paraphrase, reverse, portability), locality.

Each probe is scored two ways, side by side:
- `token_acc`: teacher-forced token accuracy, the share of answer tokens that are the argmax when the correct
  prefix is fed in (what EasyEdit reports);
- `gen`: greedy generation — does the answer actually appear in what the model says?
Reliability also gets `prob_wins`: P(target_new) > P(target_true) (CounterFact's efficacy score).
Locality compares the edited model with the unedited one (`before=`), or with the stated answers otherwise.
"""
import dataclasses
import re
import time

import torch

from . import checks
from .adapters import device_of
from .editing import edit
from .requests import EditCase, EditError, EditRequest, Probe
from .tokens import answer_logprobs, encode_pairs

KINDS = ("reliability", "paraphrase", "reverse", "portability", "locality")


def normalize(text):
    """Lower-case, drop punctuation and articles, squeeze spaces: 'The Space-Needle.' -> 'space needle'."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())



@torch.no_grad()
def teacher_forced(model, tok, prompts, answers, batch_size=16):
    """Per prompt: token accuracy, log P(answer), and the argmax token ids over the answer span."""
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = encode_pairs(tok, prompts[i:i + batch_size], answers[i:i + batch_size], device_of(model))
        logp, correct, count, argmax = answer_logprobs(model, batch)
        for b in range(len(logp)):
            pred = argmax[b][batch["answer_mask"][b]].tolist()
            rows.append({"token_acc": correct[b].item() / count[b].item(), "logprob": logp[b].item(),
                         "pred_ids": pred, "n_tokens": count[b].item()})
    return rows


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens=8, batch_size=16):
    """Greedy continuations of each prompt (left-padded batches), as text."""
    outputs, old_side = [], tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device_of(model)) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
            outputs += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return outputs


def answer_in(generated, answer):
    """Does the normalized answer occur in the normalized generation?"""
    return normalize(answer) in normalize(generated) if normalize(answer) else False


def probes_of(case):
    """{kind: [Probe]} for a case; reliability is the edit prompt itself."""
    req = case.request
    return {"reliability": [Probe(req.prompt_text, req.target_new)], "paraphrase": case.paraphrase,
            "reverse": case.reverse, "portability": case.portability, "locality": case.locality}


def _as_probe(kind, i, probe):
    """A Probe from a Probe or a (prompt, answer) pair, with both texts checked."""
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        probe = Probe(*probe)
    if not isinstance(probe, Probe):
        raise EditError(f"{kind}[{i}]: expected a Probe(prompt, answer) or a (prompt, answer) pair, got {probe!r}")
    checks.text(f"{kind}[{i}].prompt", probe.prompt, "'The Space Needle can be found in'")
    checks.text(f"{kind}[{i}].answer", probe.answer, "'Taipei'")
    return probe


def _as_case(case):
    if isinstance(case, (EditRequest, dict)):
        case = EditCase(EditRequest.coerce(case))
    if not isinstance(case, EditCase):
        raise TypeError(f"case: expected an EditCase (or EditRequest), got {type(case).__name__}")
    lists = {}
    for kind in ("paraphrase", "reverse", "portability", "locality"):
        probes = getattr(case, kind)
        if not isinstance(probes, (list, tuple)):
            raise EditError(f"{kind}: expected a list of Probe(prompt, answer), got {type(probes).__name__}")
        lists[kind] = [_as_probe(kind, i, p) for i, p in enumerate(probes)]
    return dataclasses.replace(case, **lists)


def _check_before(before, case):
    """`before` must be evaluate() of the same case on the unedited model: as many locality rows."""
    if before is None or not case.locality:
        return
    details = before.get("details") if isinstance(before, dict) else None
    rows = details.get("locality") if isinstance(details, dict) else None
    if rows is None or len(rows) != len(case.locality):
        have = "no locality scores" if rows is None else f"{len(rows)} locality rows"
        raise EditError(f"before: it has {have}, this case has {len(case.locality)}; pass "
                        "before=ke.evaluate(model, tok, case) of this same case on the unedited model")


def with_context(context, prompts):
    """Each prompt as the edited model reads it: `context` is a fixed text (IKE) or a callable prompt -> prefix."""
    if isinstance(context, str):
        return [context + p for p in prompts]
    if not callable(context):
        raise TypeError(f"context: expected a string or a callable prompt -> prefix, got {type(context).__name__}")
    out = []
    for p in prompts:
        prefix = context(p)
        if not isinstance(prefix, str):
            raise TypeError(f"context: the callable returned {type(prefix).__name__} for {p!r}; it must return the "
                            "prefix text ('' for none)")
        out.append(prefix + p)
    return out


def evaluate(model, tok, case, before=None, context="", generation=True, max_new_tokens=None):
    """Score one edit case on the current model; returns {kind: {"token_acc", "gen", ...}, "details": ...}.

    `before`: the result of evaluate() on the unedited model; locality then measures agreement with it.
    `context`: text prepended to every prompt (IKE's demonstrations; empty for weight edits), or a callable
    prompt -> prefix deciding per query (SERAC's router: the edit's prefix in its scope, '' outside).
    """
    case = _as_case(case)
    _check_before(before, case)
    kinds = {k: v for k, v in probes_of(case).items() if v}
    flat = [(k, p) for k, probes in kinds.items() for p in probes]
    prompts = with_context(context, [p.prompt for _, p in flat])
    tf = teacher_forced(model, tok, prompts, [p.answer for _, p in flat])
    gens = [None] * len(flat)
    if generation:
        n_new = max_new_tokens or max(r["n_tokens"] for r in tf) + 4
        gens = generate(model, tok, prompts, max_new_tokens=n_new)
    details = {k: [] for k in kinds}
    for (kind, probe), row, gen in zip(flat, tf, gens):
        details[kind].append({"prompt": probe.prompt, "answer": probe.answer, "token_acc": row["token_acc"],
                              "logprob": row["logprob"], "pred_ids": row["pred_ids"], "generated": gen,
                              "gen": None if gen is None else float(answer_in(gen, probe.answer))})
    if before is not None and "locality" in details:
        for after_row, before_row in zip(details["locality"], before["details"]["locality"]):
            same = [a == b for a, b in zip(after_row["pred_ids"], before_row["pred_ids"])]
            after_row["token_acc"] = sum(same) / max(len(same), 1)
            if after_row["generated"] is not None and before_row["generated"] is not None:
                after_row["gen"] = float(normalize(after_row["generated"]) == normalize(before_row["generated"]))
    scores = {}
    for kind, rows in details.items():
        scores[kind] = {"token_acc": sum(r["token_acc"] for r in rows) / len(rows)}
        if generation:
            scores[kind]["gen"] = sum(r["gen"] for r in rows) / len(rows)
    if case.request.target_true:  # P(new) > P(true): CounterFact's efficacy and paraphrase scores (ROME's ES, PS)
        for kind in ("reliability", "paraphrase"):
            rows = details.get(kind, [])
            if not rows:
                continue
            true = teacher_forced(model, tok, [prompts[j] for j, (k, _) in enumerate(flat) if k == kind],
                                  [case.request.target_true] * len(rows))
            for row, t in zip(rows, true):
                row["logprob_true"] = t["logprob"]
            scores[kind]["prob_wins"] = sum(r["logprob"] > t["logprob"] for r, t in zip(rows, true)) / len(rows)
    scores["details"] = details
    return scores


@dataclasses.dataclass
class EditScore:
    """score_edit's answer: scores before and after one edit, its costs, and the EditResult (already undone)."""
    before: object          # evaluate() on the unedited model (a list of them when several cases were edited)
    after: object           # evaluate() on the edited model, locality measured against `before`
    seconds: float          # the edit itself (EditResult.seconds)
    eval_seconds: float     # scoring the edited model (IKE pays its context here, on every query)
    context: object         # what the edit prepends to queries: IKE's text, SERAC's router (callable), else ''
    result: object          # the EditResult, undone: the model is bit-identical to before


def score_edit(model, tok, case, method="rome", before=None, generation=True, config=None, **hparams):
    """Edit `case` with `method`, score the model before and after (chapter 2's metrics), then undo the edit.

    `case` may be a list of cases: one edit of all their requests, each case scored (`before`/`after` are lists).
    `before` (evaluate() of the unedited model, or a list of them) skips scoring the unedited model again.
    """
    several = isinstance(case, (list, tuple))
    cases = [_as_case(c) for c in (case if several else [case])]
    befores = list(before) if several and before is not None else [before] * len(cases)
    befores = [b if b is not None else evaluate(model, tok, c, generation=generation) for c, b in zip(cases, befores)]
    requests = [c.request for c in cases]
    result = edit(model, tok, requests if several else requests[0], method=method, config=config, **hparams)
    context = result.context
    try:
        start = time.perf_counter()
        afters = [result.evaluate(model, tok, c, before=b, generation=generation) for c, b in zip(cases, befores)]
        eval_seconds = time.perf_counter() - start
    finally:
        result.undo()
    pick = (lambda rows: rows) if several else (lambda rows: rows[0])
    return EditScore(pick(befores), pick(afters), result.seconds, eval_seconds, context, result)


def summarize(all_scores):
    """Average a list of evaluate() results into one flat {'reliability.token_acc': ...} dict."""
    sums, counts = {}, {}
    for scores in all_scores:
        for kind in KINDS:
            for mode, value in scores.get(kind, {}).items():
                key = f"{kind}.{mode}"
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def table(scores):
    """One evaluate() result as rows [kind, token_acc, gen, prob_wins] for display."""
    return [[kind, scores[kind].get("token_acc"), scores[kind].get("gen"), scores[kind].get("prob_wins")]
            for kind in KINDS if kind in scores]


@torch.no_grad()
def perplexity(model, tok, texts):
    """Token-level perplexity of `texts` (side effects of an edit on ordinary language, chapter 8)."""
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device_of(model))
        if ids.shape[1] < 2:
            raise ValueError(f"texts: {text!r} is too short to score; pass sentences of two tokens or more")
        logits = model(input_ids=ids).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        total_tokens += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))
