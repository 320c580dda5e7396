"""What loading a model gives back: the model with its tokenizer, the dtype names, and the byte-level
tokenizer of the tiny test models. A leaf module: model loading and checkpoint loading both return these."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer or ByteTokenizer
    name: str
    source: str  # where the weights came from (path, cache file, "random-init")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): lets the tiny random models run on real text offline."""

    vocab_size = 256
    bos_token_id = None
    eos_token_id = 0
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None, **_: object) -> dict:
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def __len__(self) -> int:
        return self.vocab_size
