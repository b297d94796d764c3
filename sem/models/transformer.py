"""Causal pre-norm Transformer baseline with the same forward contract as SEMModel."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from sem.contracts import ModelOutput, cross_entropy
from sem.models.common import check_input_length, size_problems


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float, n_layers: int) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        hidden = max(1, int(mlp_ratio * d_model))
        self.fc = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)
        for out in (self.proj, self.fc_out):  # GPT-2: scale residual writes by depth
            nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, C]
        # record_function labels name the parts for bench/profile_sem.py --transformer (a no-op unless profiling)
        B, T, C = x.shape
        with record_function("transformer/attention"):
            q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # [B, H, T, C/H]
            x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, T, C)))
        with record_function("transformer/mlp"):
            return x + self.drop(self.fc_out(F.gelu(self.fc(self.norm2(x)))))


def settings_problems(prefix: str = "", **s: Any) -> list[str]:
    """Every problem with TransformerLM's arguments ``s``, one line each naming ``<prefix><key>``: run
    by its constructor and by the config's validation (``sem.config.groups.model``)."""
    p = size_problems(prefix, s, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"), default_ratio=4.0)
    heads, width = s.get("n_heads"), s.get("d_model")
    if isinstance(heads, int) and heads > 0 and isinstance(width, int) and width % heads:
        p.append(f"{prefix}n_heads={heads}: must divide {prefix}d_model={width}")
    dropout = s.get("dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        p.append(f"{prefix}dropout={dropout!r}: must be in [0, 1)")
    return p


class TransformerLM(nn.Module):
    """Token + learned position embeddings -> N pre-norm blocks -> LayerNorm -> linear head."""

    no_decay_keywords: ClassVar[tuple[str, ...]] = ("norm", "bias")
    # >=2-D weights that are not hidden matrices (kept out of Muon): tok_emb, pos_emb and the head.
    non_matrix_keywords: ClassVar[tuple[str, ...]] = ("emb", "head")
    # Taken (and ignored: it has no unitary state) by earlier versions, whose configs and checkpoints
    # hold it: sem.contracts.model_kwargs drops it when a model is rebuilt from one.
    retired_arguments: ClassVar[tuple[str, ...]] = ("unitary_lambda",)

    def __init__(
        self,
        vocab_size: int = 259,
        d_model: int = 192,
        n_layers: int = 4,
        n_heads: int = 4,
        max_seq_len: int = 2048,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        bad = settings_problems(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                max_seq_len=max_seq_len, mlp_ratio=mlp_ratio, dropout=dropout)
        if bad:
            raise ValueError("; ".join(bad))
        super().__init__()
        self.max_seq_len = max_seq_len
        self.gradient_checkpointing = gradient_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout, n_layers) for _ in range(n_layers)
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def set_step(self, step: int) -> None:
        """No step-dependent behaviour; present for a uniform model interface."""

    def probes(self) -> dict[str, float]:
        """No model-specific diagnostics (SEMModel.probes has sem/*); present for a uniform interface."""
        return {}

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        check_input_length(input_ids, self.max_seq_len)
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        with record_function("transformer/embed"):
            x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # [B, T, C]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        with record_function("transformer/readout"):
            logits = self.head(self.norm_f(x)).float()  # [B, T, V]
        if targets is None:
            return ModelOutput(logits)
        with record_function("transformer/cross_entropy"):
            ce = cross_entropy(logits, targets)  # no loss terms of its own
        return ModelOutput(logits, loss=ce, ce_loss=ce)
