"""Post-training data: JSONL rows in the shapes people already have, encoded with the model's own chat format.

SFT rows are `{"messages": [...], "tools": [...]?}` (OpenAI-shaped messages, tool calls included); the loss is on
what the assistant wrote — its content and its end-of-turn token — and on nothing the model is only shown.
Preference rows are `{"prompt": [...], "chosen": {...}, "rejected": {...}, "edited": {...}?}`.

Targets are stored shifted, as the loss reads them: `labels[i]` is the token that position i must predict, or
IGNORE where nothing is learnt. Every bad row fails with one line naming the file and row.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from herd.rows import DataError

IGNORE = -100


@dataclass
class Example:
    """One dialog's ids with, per id, whether the model learns to write it."""

    ids: list[int]
    target: list[bool]

    def __post_init__(self):
        assert len(self.ids) == len(self.target)


@dataclass
class PreferenceExample:
    """A prompt and its ranked replies (best first: edited?, chosen, rejected), each reply as ids.

    `formatting` marks, per reply id, the chat format's own tokens (end of turn, tool tags) that Llama 3's DPO
    leaves out of the reply's log-probability.
    """

    prompt: list[int]
    replies: list[list[int]]
    formatting: list[list[bool]]


class DialogEncoder:
    """Dialogs to ids with the chat format of the model being tuned (Llama 3's, or a checkpoint's own template).

    Only the format's public `encode_dialog` is used: the assistant's reply to `messages[:i]` is what
    `encode_dialog(messages[:i+1])` adds after `encode_dialog(messages[:i])`, up to and including the first stop
    token. So any template that renders earlier turns the same whatever follows works, and one that does not is
    refused rather than trained on wrong targets.
    """

    def __init__(self, chat_format):
        self.chat_format = chat_format
        tokenizer = chat_format.tokenizer
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.special_ids = frozenset(tokenizer.special_tokens.values())

    def prompt(self, messages: Sequence[dict], tools: list | None = None, where: str = "") -> list[int]:
        try:
            return self.chat_format.encode_dialog(messages, tools=tools)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where}: the chat format cannot encode these messages ({_brief(error)})") from None

    def reply(self, prompt: list[int], messages: Sequence[dict], reply: dict, tools: list | None = None,
              where: str = "") -> list[int]:
        """The ids the assistant writes for `reply` after `messages`, whose encoding is `prompt`."""
        written = self.continued(prompt, self.prompt([*messages, reply], tools, where), where)[len(prompt):]
        end = next((i for i, t in enumerate(written) if t in self.stop_ids), None)
        if end is None:
            raise DataError(f"{where}: the chat format wrote no end-of-turn token after the assistant's reply")
        return written[:end + 1]

    def dialog(self, messages: Sequence[dict], tools: list | None = None, where: str = "",
               max_len: int | None = None) -> Example:
        """Every assistant turn is a target; the last one ends the example (later turns teach nothing), or the
        first to reach `max_len` ids: each turn encodes the dialog so far again, and a dialog of 320 turns had taken
        2.1 s to be cut to its first 2,048 ids."""
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not turns:
            raise DataError(f"{where}: no assistant turn to learn from; every SFT row needs one")
        ids: list[int] = []
        target: list[bool] = []
        for i in turns:
            prompt = self.continued(ids, self.prompt(messages[:i], tools, where), where)
            target += [False] * (len(prompt) - len(ids))
            written = self.reply(prompt, messages[:i], messages[i], tools, where)
            ids = prompt + written
            target += [True] * len(written)
            if max_len is not None and len(ids) >= max_len:
                break
        return Example(ids, target)

    def continued(self, ids: list[int], longer: list[int], where: str) -> list[int]:
        """`longer`, the encoding of a dialog that goes on from the one encoded as `ids`, as ids followed by what
        comes after them. Encoded whole, a text that goes on can merge across the end of `ids` (a reply opening with
        a blank line after the template's newline): what follows is then encoded alone, as the model given `ids`
        would write it. Such a row had been refused, and a sampled reply opening so had ended a PPO run."""
        if longer[:len(ids)] == ids:
            return longer
        tokenizer = self.chat_format.tokenizer
        before, text = tokenizer.decode(ids), tokenizer.decode(longer)
        if not text.startswith(before):
            raise DataError(f"{where}: the chat template renders earlier turns differently once a reply follows; "
                            "its targets cannot be found")
        # Only the stretch of text the boundary falls in is encoded again, as plain text: the rest keeps the chat
        # format's ids, whose special-token text inside a message is text (read as tokens, a reply opening with a
        # blank line had forged the turns it quoted, and changed which tokens were learned).
        tail, start = [], 0
        for special, run in itertools.groupby(longer, key=self.special_ids.__contains__):
            # A special token is a piece of its own, never encoded again (the template's <|eot_id|> and the next
            # <|start_header_id|> are adjacent); a run of text tokens is one piece.
            for piece_ids in ([t] for t in run) if special else [list(run)]:
                piece = tokenizer.decode(piece_ids)
                if start + len(piece) > len(before):
                    tail += piece_ids if start >= len(before) or special else \
                        tokenizer.encode(piece[len(before) - start:], bos=False)
                start += len(piece)
        return ids + tail

    def formatting(self, ids: Sequence[int]) -> list[bool]:
        return [t in self.special_ids for t in ids]


def _brief(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _messages(row: dict, key: str, where: str) -> list[dict]:
    messages = row.get(key)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f'{where}: "{key}" must be a list of messages ({{"role": ..., "content": ...}})')
    return messages


def _reply(row: dict, key: str, where: str) -> dict:
    """A reply given as a message, as a one-message list, or as plain text."""
    reply = row.get(key)
    if isinstance(reply, str):
        reply = {"role": "assistant", "content": reply}
    elif isinstance(reply, list) and len(reply) == 1:
        reply = reply[0]
    if not isinstance(reply, dict) or reply.get("role", "assistant") != "assistant":
        raise DataError(f'{where}: "{key}" must be an assistant message, e.g. {{"role": "assistant", "content": ...}}')
    return {"role": "assistant", **reply}


def encode_sft(rows: Iterable[tuple[str, dict]], encoder: DialogEncoder, max_len: int) -> list[Example]:
    """Encode SFT rows; a dialog longer than `max_len` keeps its first `max_len` ids (and must keep a target)."""
    examples = []
    for where, row in rows:
        example = encoder.dialog(_messages(row, "messages", where), row.get("tools"), where, max_len)
        example = Example(example.ids[:max_len], example.target[:max_len])
        if not any(example.target):
            raise DataError(f"{where}: no assistant token within the first {max_len} tokens; "
                            "raise the sequence length or shorten the prompt")
        examples.append(example)
    return examples


def encode_preferences(rows: Iterable[tuple[str, dict]], encoder: DialogEncoder, max_len: int
                       ) -> list[PreferenceExample]:
    """Encode preference rows; a prompt + reply longer than `max_len` loses the end of the reply."""
    examples = []
    for where, row in rows:
        prompt_messages = _messages(row, "prompt", where)
        keys = ["edited", "chosen", "rejected"] if row.get("edited") is not None else ["chosen", "rejected"]
        replies = [_reply(row, k, where) for k in keys]
        # Every pair, not only neighbours: a ranked triple trains on all three of its pairs (edited > rejected too).
        for (a, ra), (b, rb) in itertools.combinations(zip(keys, replies), 2):
            if ra == rb:
                raise DataError(f"{where}: {a} and {b} are the same reply; a preference needs two different ones")
        tools = row.get("tools")
        prompt = encoder.prompt(prompt_messages, tools, where)
        if len(prompt) >= max_len:
            raise DataError(f"{where}: the prompt alone is {len(prompt)} tokens, over the sequence length {max_len}")
        written = [encoder.reply(prompt, prompt_messages, r, tools, where)[:max_len - len(prompt)] for r in replies]
        examples.append(PreferenceExample(prompt, written, [encoder.formatting(w) for w in written]))
    return examples


def pack(examples: Sequence[Example], seq_len: int, *, seed: int | None = 0) -> list[dict[str, torch.Tensor]]:
    """Examples packed into rows of `seq_len` ids (first fit, in a seeded shuffled order), one document each.

    Returns one dict per row: tokens, labels (shifted targets, IGNORE elsewhere) and document_ids, under which
    attention and positions restart at every example. Padding is a document of its own with no targets.
    """
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    too_long = next((len(examples[i].ids) for i in order if len(examples[i].ids) > seq_len), None)
    if too_long is not None:
        raise DataError(f"an example of {too_long} tokens does not fit the sequence length {seq_len}")
    slots = first_fit([len(examples[i].ids) for i in order], seq_len)
    rows: list[list[Example]] = [[] for _ in range(max(slots, default=-1) + 1)]
    for i, slot in zip(order, slots):
        rows[slot].append(examples[i])
    return [_packed_row(row, seq_len) for row in rows]


def first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """Each length's row under first fit (the first row with room for it, else a new one), each at most `capacity`.

    A tree of the rows' free room finds the first with room in log(rows) steps: a scan from the first row for every
    example had taken 15.6 s over 100,000 of them. Rows not yet opened are leaves with all their room, so the first
    fitting leaf is an open row or, failing one, the next new row."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    room = [capacity] * (2 * size)  # node k's children are 2k and 2k+1; the leaves, size.., are the rows
    slots = []
    for n in lengths:
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        slots.append(node - size)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return slots


def _packed_row(examples: Sequence[Example], seq_len: int) -> dict[str, torch.Tensor]:
    tokens = torch.zeros(seq_len, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
    docs = torch.full((seq_len,), len(examples), dtype=torch.long)
    at = 0
    for d, example in enumerate(examples):
        n = len(example.ids)
        ids = torch.tensor(example.ids)
        tokens[at:at + n] = ids
        docs[at:at + n] = d
        # Position j predicts id j+1 of the same document; the last id of a document predicts nothing.
        shifted = torch.where(torch.tensor(example.target[1:]), ids[1:], IGNORE)
        labels[at:at + n - 1] = shifted
        at += n
    return {"tokens": tokens, "labels": labels, "document_ids": docs}


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def preference_batch(examples: Sequence[PreferenceExample], *, mask_formatting: bool, pad_id: int = 0
                     ) -> dict[str, torch.Tensor]:
    """Prompt + reply rows, right-padded: every example's best reply first, then its next, and so on.

    labels hold the reply's ids (shifted) and IGNORE over the prompt and padding; with `mask_formatting` the
    format's own tokens are IGNORE too (Llama 3's DPO). lengths: prompt + reply ids per row; n: examples.
    """
    n_ranks = len(examples[0].replies)
    if any(len(e.replies) != n_ranks for e in examples):
        raise DataError("a batch mixes ranked triples with pairs; give every row an \"edited\" reply or none")
    sequences = [(e.prompt, e.replies[r], e.formatting[r]) for r in range(n_ranks) for e in examples]
    width = max(len(p) + len(w) for p, w, _ in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    lengths = torch.tensor([len(p) + len(w) for p, w, _ in sequences])
    for row, (prompt, written, formatting) in enumerate(sequences):
        ids = prompt + written
        tokens[row, :len(ids)] = torch.tensor(ids)
        learnt = [t if not (mask_formatting and f) else IGNORE for t, f in zip(written, formatting)]
        labels[row, len(prompt) - 1:len(ids) - 1] = torch.tensor(learnt)
    return {"tokens": tokens, "labels": labels, "lengths": lengths, "n": torch.tensor(len(examples))}
