"""The captioner's tokenizer: open_clip's bundled BPE (``SimpleTokenizer``, offline, 49,408 ids, SOT 49406,
EOT 49407) extended by two ids, ``[MASK] = 49408`` and ``[PAD] = 49409``. A fixed vocabulary keeps
checkpoints independent of any training corpus and lets the trainer build the model before seeing data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer


class CaptionTokenizer:
    """open_clip BPE + ``[MASK]``/``[PAD]``: ``tok(texts) -> LongTensor [B, context_length]``.

    Rows are ``SOT w_1 .. w_n EOT PAD ...``; captions longer than the context are truncated before EOT
    (EOT is always present). ``decode(ids)`` stops at EOT and skips special ids.
    """

    def __init__(self, context_length: int = 32):
        if int(context_length) < 3:
            raise ValueError(f"context_length must be >= 3 (SOT, a word, EOT), got {context_length}")
        self.context_length = int(context_length)
        self._bpe = None
        bpe = self.bpe
        self.base_vocab_size = len(bpe.encoder)
        self.sot_id = int(bpe.encoder["<start_of_text>"])
        self.eot_id = int(bpe.encoder["<end_of_text>"])
        self.mask_id = self.base_vocab_size
        self.pad_id = self.base_vocab_size + 1
        self.vocab_size = self.base_vocab_size + 2

    @property
    def bpe(self):
        if self._bpe is None:
            self._bpe = SimpleTokenizer()
        return self._bpe

    def __getstate__(self):  # ship to Ray workers without the BPE caches; rebuilt lazily
        state = dict(self.__dict__)
        state["_bpe"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"CaptionTokenizer(bpe=open_clip, context_length={self.context_length}, vocab={self.vocab_size})"
        )

    def encode_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
        return self.bpe.encode(text)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            words = self.encode_words(text)[: length - 2]
            row = [self.sot_id, *words, self.eot_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one id sequence: stops at EOT, skips SOT/[MASK]/[PAD]."""
        words = []
        for t in ids:
            t = int(t)
            if t == self.eot_id:
                break
            if t in (self.sot_id, self.mask_id, self.pad_id) or t >= self.base_vocab_size:
                continue
            words.append(t)
        return self.bpe.decode(words).strip() if words else ""
