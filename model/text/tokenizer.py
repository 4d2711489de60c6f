"""Vicuna's tokenizer as the original saw it: sentencepiece pieces plus six added tokens.

The original tokenized each prompt piece with the slow, legacy LlamaTokenizer of transformers 4.29, which equals raw
sentencepiece on every piece (each gets sentencepiece's leading "▁"). transformers 5 only has the fast tokenizer,
which differs on pieces starting with a space, so prompts are tokenized with sentencepiece directly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import sentencepiece as spm

# The original called add_tokens with Python sets for video/audio; transformers 4.29 stored their str() form.
ADDED_TOKENS = ("<Img>", "</Img>", "{'<Vid>'}", "{'</Vid>'}", "{'<Aud>'}", "{'</Aud>'}")
STOP_PIECE = "▁###"  # id 835 in Vicuna: the original's only stop id


class PromptTokenizer:
    def __init__(self, model_file: str | Path, added: dict[str, int] | None = None) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"{self.model_file}: tokenizer.model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as e:  # empty, truncated or not a sentencepiece file
            reason = (str(e).strip().splitlines() or ["unreadable"])[0]
            raise ValueError(f"{self.model_file}: not a sentencepiece model ({reason})") from e
        base = self.sp.get_piece_size()
        self.added = added if added is not None else {tok: base + i for i, tok in enumerate(ADDED_TOKENS)}
        self.added_by_id = {i: tok for tok, i in self.added.items()}
        self._added_split = re.compile("(" + "|".join(re.escape(t) for t in self.added) + ")") if self.added else None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.eos_id  # the original pads with EOS
        self.stop_id = self.sp.piece_to_id(STOP_PIECE)
        if self.stop_id == self.sp.unk_id():
            raise ValueError(f"{self.model_file}: no '{STOP_PIECE}' piece, which generation stops on")
        # "\n###" as it appears after an answer: the newline byte and "###" without a leading "▁"
        tail = self.sp.encode("\n###")
        self.newline_stop = tail[1:] if self.sp.id_to_piece(tail[0]) == "▁" else tail

    @classmethod
    def from_dir(cls, folder: str | Path) -> PromptTokenizer:
        """A tokenizer folder as transformers 4.29 saved it; without added_tokens.json the six are appended."""
        folder = Path(folder)
        added_file = folder / "added_tokens.json"
        added = json.loads(added_file.read_text()) if added_file.is_file() else None
        return cls(folder / "tokenizer.model", added)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    def encode(self, text: str) -> list[int]:
        """One prompt piece, no special tokens, as the slow tokenizer split it around added tokens.

        Text that is not valid Unicode (a lone surrogate) is a ValueError saying so, not sentencepiece's RuntimeError.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode ({e.reason} at character {e.start}): {text[:60]!r}") from None
        if self._added_split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        parts = self._added_split.split(text)
        for i, part in enumerate(parts):
            if part in self.added:
                ids.append(self.added[part])
                continue
            # the slow tokenizer strips whitespace next to non-special added tokens
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text with special tokens skipped (the original's skip_special_tokens=True)."""
        special = {self.bos_id, self.eos_id, self.sp.unk_id()}
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in special:
                continue
            if i in self.added_by_id:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.added_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(out)

    def save(self, folder: str | Path) -> None:
        """Writes the files transformers' LlamaTokenizer and the original code read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (folder / "tokenizer.model").resolve():
            shutil.copyfile(self.model_file, folder / "tokenizer.model")
        if self.added:  # a base Vicuna folder has none; the six are added on load, as the original does
            (folder / "added_tokens.json").write_text(json.dumps(self.added, indent=2))
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
