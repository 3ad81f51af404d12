"""Sentence embeddings for choosing nearest-neighbour demonstrations: a BERT encoder, mean-pooled.

MiniLM (``minilm``, all-MiniLM-L6-v2) is trained for this: the mean of its last hidden states over real
tokens, L2-normalised, is the sentence-transformers embedding, so a dot product is the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class SentenceEncoder:
    """``encode(texts) -> (N, H)`` unit vectors from ``model_name`` (a BERT directory or asset name)."""

    def __init__(self, model_name: str = "minilm", device: str | torch.device | None = None,
                 max_length: int = 128, batch_size: int = 64) -> None:
        from ..models import BertModel
        from ..tokenizer import AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = BertModel.from_pretrained(model_name).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(batch["input_ids"], batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)
