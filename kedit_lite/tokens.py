"""Tokenization shared by every method: prompt + answer batches, and where the subject's last token is."""
import unicodedata

import torch


def _is_cjk(ch):
    return "CJK" in unicodedata.name(ch, "") or unicodedata.category(ch).startswith("P") and ord(ch) > 0x3000


def join(prompt, answer):
    """The text the model should produce after `prompt`: the answer, with a space unless none belongs there."""
    if not answer or prompt.endswith((" ", "\n", "\t")) or _is_cjk(answer[0]) or (prompt and _is_cjk(prompt[-1])):
        return answer
    return " " + answer


def pad_right(tok, rows, device=None):
    """Right-pad lists of token ids into (ids, attention_mask) long tensors."""
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def encode_pairs(tok, prompts, answers, device=None):
    """Right-padded batch of prompt+answer; returns ids, mask, and a mask of the answer tokens' positions.

    `answer_mask[b, t]` is True where token t+1 is an answer token, so `logits[answer_mask]` predicts them.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"answers: got {len(answers)} answers for {len(prompts)} prompts; pass one per prompt")
    rows, starts = [], []
    for prompt, answer in zip(prompts, answers):
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(join(prompt, answer), add_special_tokens=False).input_ids
        if not a:
            raise ValueError(f"answer: {answer!r} tokenizes to nothing; pass a non-empty answer")
        rows.append(p + a)
        starts.append(len(p))
    ids, mask = pad_right(tok, rows)
    answer_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows, starts)):
        answer_mask[b, start - 1:len(row) - 1] = True
    labels = torch.where(answer_mask, ids.roll(-1, dims=1), torch.full_like(ids, -100))
    out = {"input_ids": ids, "attention_mask": mask, "answer_mask": answer_mask, "labels": labels,
           "prompt_lengths": torch.tensor(starts)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def answer_logprobs(model, batch):
    """Per-row sum of log P(answer tokens | prompt) and per-row count of tokens the argmax gets right."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    labels = batch["labels"].clamp(min=0)
    token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    m = batch["answer_mask"]
    correct = (logits.argmax(-1) == labels) & m
    return (token_logp * m).sum(1), correct.sum(1), m.sum(1), logits.argmax(-1)


def answer_nll(model, batch):
    """Mean negative log-likelihood of the answer tokens (the loss every gradient-based editor minimises)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                             ignore_index=-100)


def subject_token_range(tok, text, subject):
    """(first, last+1) token indices covering the first occurrence of `subject` in `text`."""
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject: {subject!r} does not occur in {text!r}; pass a subject that the prompt contains")
    end = start + len(subject)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    covered = [i for i, (s, e) in enumerate(offsets) if e > start and s < end]
    return covered[0], covered[-1] + 1


def last_token_index(tok, text):
    """Index of the last token of `text`."""
    return len(tok(text, add_special_tokens=False).input_ids) - 1


def subject_last_index(tok, text, subject):
    """Index of the last token of the first occurrence of `subject` in `text` (ROME's edit position)."""
    return subject_token_range(tok, text, subject)[1] - 1


def chat(tok, message, answer_start=""):
    """One user turn in the tokenizer's chat template, the assistant's answer begun with `answer_start`.

    Trailing whitespace is dropped, so `join` puts one space before the answer that follows (chapters 1 and 8).
    """
    if not getattr(tok, "chat_template", None):
        from .requests import EditError
        raise EditError("tok: this tokenizer has no chat template; write the prompt as plain text for base models")
    prompt = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                     add_generation_prompt=True)
    return (prompt + answer_start).rstrip()
