"""Model surgery: a Hugging Face Llama-family checkpoint becomes a trainable stream model.

Two additions, both in the paper's format so the engine serves the result unchanged:

- a channel embedding ``[C, hidden]`` added to the token embedding before layer 0
  (saved as ``model.channel_embedding.weight``, ``num_channels`` in config.json). It starts
  at zero, so step 0 is exactly the base model (the paper treats untrained ones as zero);
- LoRA adapters (``peft``) on every attention and MLP projection; the base weights stay
  frozen. Why LoRA and not full fine-tuning: the result must ship inside the repository
  (an adapter of a few MB against 540 MB of weights), the optimizer state is 2% of the
  model's, and the frozen matmuls need no weight gradients (a third of a full step's arithmetic).

The forward runs transformers' own decoder with our 4D mask and per-token positions, so the
layout the model learns is checked against code nobody here wrote when the engine serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: The projections LoRA adapts (every matmul of a Llama decoder layer).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16


class StreamModel(nn.Module):
    """A causal LM with a channel embedding and LoRA adapters; ``loss(batch)`` is the training step."""

    def __init__(self, base: nn.Module, num_channels: int, lora: LoraSettings):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        self.lm = get_peft_model(
            base,
            LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
            ),
        )
        hidden = base.config.hidden_size
        self.num_channels = num_channels
        self.channel_embedding = nn.Parameter(torch.zeros(num_channels, hidden))

    @classmethod
    def from_dir(cls, path: Path | str, num_channels: int, lora: LoraSettings) -> StreamModel:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa"
        )
        return cls(base, num_channels, lora)

    @property
    def decoder(self) -> nn.Module:
        return self.lm.base_model.model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.base_model.model.lm_head

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states ``[B, S, hidden]`` of a collated batch (``train.render.collate``)."""
        x = self.decoder.embed_tokens(batch["input_ids"])
        chans = batch["channel_ids"].clamp(max=self.num_channels - 1)
        x = x + self.channel_embedding[chans].to(x.dtype)
        out = self.decoder(
            inputs_embeds=x, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
        return out.last_hidden_state

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm_head(self.hidden(batch)).float()

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Weighted mean next-token loss over the labelled positions, and how many there were.

        ``batch["weights"]`` (optional) weighs each position. Only labelled positions go
        through the LM head (49k columns): a grid's User cells and the padding are a third of
        the tokens, and the head costs as much as eight of SmolLM2's layers.
        """
        h = self.hidden(batch)
        keep = batch["labels"] != -100
        logits = self.lm_head(h[keep]).float()
        per_token = F.cross_entropy(logits, batch["labels"][keep], reduction="none")
        weights = batch.get("weights")
        if weights is None:
            return per_token.mean(), int(keep.sum())
        w = weights[keep].to(per_token.dtype)
        return (per_token * w).sum() / w.sum(), int(keep.sum())
