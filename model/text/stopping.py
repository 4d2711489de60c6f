"""Where a generated row ends, written once: every decoder (the engine, the static loop, transformers' `generate`) and
the server's finish reason apply this rule, so every decoder ends a row at the same token.

A row ends at the first of:
- EOS, which its ids do not keep;
- a stop id sequence, kept: "▁###" (id 835, the original's only stop) or "\\n###" as the tokenizer spells it;
- the id that completes the answer's end "\\n###" in the decoded text, however the model spelled it, kept;
- its token budget (`max_new_tokens`), which a decoder enforces by making no more.
The answer is the text before the first "\\n###" (`model.text.prompt.answer_text`), so ending there changes no
answer: a row just stops as soon as its answer cannot change any more.

Decoders check ids as they come: on the device, the id part every step (`ended_on_device`); on the host, the whole
rule at their syncs (`StopRule.end` with `since`, reading only the newest ids), then the ids are cut with `cut`.
The text is matched by decoding with the tokenizer answers are decoded with, not with transformers'
StopStringCriteria: that needs a transformers tokenizer, and the prompt tokenizer is raw sentencepiece
(model/text/tokenizer.py says why), so the stop and the answer's cut agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.text.prompt import TARGET_END
from model.text.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class StopRule:
    eos: int
    stops: tuple[tuple[int, ...], ...]  # stop id sequences
    decode: Callable[[list[int]], str]  # ids -> text, special ids skipped
    text: str = TARGET_END

    @classmethod
    def of(cls, tok: PromptTokenizer) -> StopRule:
        """The rule of `tok`'s ids, decoding with `tok.decode` as it is at each call."""
        return cls(tok.eos_id, ((tok.stop_id,), tuple(tok.newline_stop)), lambda ids: tok.decode(ids))

    @property
    def lookback(self) -> int:
        """Ids before `since` that `end` reads: enough for a stop sequence or the text to straddle `since` (every id
        of the text gives it at least one character)."""
        return max([len(self.text), *(len(s) for s in self.stops)])

    def end(self, ids: Sequence[int], since: int = 0) -> int | None:
        """How many of `ids` the row keeps if it ended within them, else None (the budget aside). `since`: leading
        ids already found not to end the row; only ids from `lookback` before it are read."""
        ids = list(ids)
        keep = None
        for i in range(since, len(ids)):
            if ids[i] == self.eos:
                keep = i
                break
            if any(len(s) <= i + 1 and tuple(ids[i + 1 - len(s) : i + 1]) == s for s in self.stops):
                keep = i + 1
                break
        start = max(0, since - self.lookback)
        limit = len(ids) if keep is None else keep
        if self.text not in self.decode(ids[start:limit]):
            return keep
        low, high = max(start, since), limit  # the first k with the text in ids[start:k] lies in (low, high]
        while high - low > 1:
            mid = (low + high) // 2
            if self.text in self.decode(ids[start:mid]):
                high = mid
            else:
                low = mid
        return high

    def cut(self, ids: Sequence[int]) -> list[int]:
        """A row's ids up to its end (all of them if it has not ended)."""
        keep = self.end(ids)
        return list(ids if keep is None else ids[:keep])

    def finish_reason(self, ids: Sequence[int], max_new_tokens: int) -> str:
        """OpenAI's finish_reason of a row's cut ids: "length" when it ran to its budget without ending, else "stop"
        (an EOS is cut off, so a row one short of its budget ended on one)."""
        return "length" if len(ids) >= max_new_tokens and self.end(ids) is None else "stop"


class RowEnds:
    """Which rows of a batch have ended, as their ids arrive (each id is checked once, with its `lookback`)."""

    def __init__(self, rule: StopRule, rows: int) -> None:
        self.rule = rule
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def add(self, new: Sequence[Sequence[int]]) -> list[bool]:
        """Appends each row's new ids; whether each row has ended."""
        for b, ids in enumerate(new):
            row, since = self.ids[b], len(self.ids[b])
            row.extend(ids)
            if not self.done[b]:
                first = max(0, since - self.rule.lookback)
                self.done[b] = self.rule.end(row[first:], since - first) is not None
        return self.done


def ended_on_device(
    out: torch.Tensor, count: torch.Tensor, max_new: torch.Tensor, eos: int, stops: list[torch.Tensor]
) -> torch.Tensor:
    """The rule's id part on the device, for rows whose ids so far are `out[r, :count[r]]` ([rows, columns]): rows
    whose newest id is EOS or ends a stop sequence (`StopRule.stops` as tensors), or that reached `max_new`."""
    rows = torch.arange(out.shape[0], device=out.device)
    end = count >= max_new
    end |= out[rows, (count - 1).clamp(min=0)] == eos
    for stop in stops:
        m = len(stop)
        tail = out.gather(1, (count.unsqueeze(-1) - m + torch.arange(m, device=stop.device)).clamp(0))
        end |= (count >= m) & (tail == stop).all(-1)
    return end
