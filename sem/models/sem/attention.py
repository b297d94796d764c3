"""Local attention for SEM (``model.attention_every``): causal softmax attention over the last
``window`` positions of the residual state, as Griffin interleaves local attention with its
recurrence. The SEM's recurrence, before it, gives it the order of the tokens, so by default it takes no
positional encoding (as Jamba's attention layers); ``rope`` turns each complex channel of the queries and
keys by a phase proportional to the position (RoPE, which is a phase rotation in SEM's complex features):
the scores then depend on the distance between query and key. Its state is the keys and values of the
last ``window - 1`` positions (not rotated): constant in the context length, like the recurrence's."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.blocks import ComplexRMSNorm, norm_floor, norm_map, unit_rms
from sem.models.sem.kernels import _no_autocast

HEAD_DIM = 64  # real features per head (32 complex channels)
ROPE_BASE = 10000.0  # channel i of a head turns by position * ROPE_BASE^(-i / channels per head) (RoPE's)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh), where ``mask``) v. In float32 torch's fused kernel; in bf16 (autocast)
    written out, the softmax in float32: on CPU the fused kernel's bf16 forward + backward took 2.9x as
    long as this (and its fp32 one 0.6x; B 16, 4 heads, T 128, 2026-12-04)."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


class LocalAttention(nn.Module):
    """psi + out(attention(norm(psi))) on psi [B, T, 2D] (interleaved Re, Im as real features: R-linear
    maps, as the blocks' projections). ``kv`` [B, L, 4D]: the keys and values of the L <= window - 1
    positions before psi[:, 0] (None or L = 0: a document's start); ``keep`` [B, T] bool: where those
    may be read (a row's carried context stops at its first BOS, as the recurrence's state does)."""

    def __init__(self, d_model: int, window: int, n_layers: int, rope: bool = False) -> None:
        super().__init__()
        d2 = 2 * d_model
        self.window = window
        self.heads = max(1, d2 // HEAD_DIM)
        if d2 % self.heads:
            raise ValueError(f"2 * d_model={d2} must be a multiple of the {self.heads} attention heads")
        self.rope = rope
        if rope:  # [D] the turn per position of each complex channel (the same ladder in every head)
            per_head = d_model // self.heads
            freq = ROPE_BASE ** (-torch.arange(per_head, dtype=torch.float32) / per_head)
            self.register_buffer("rope_freq", freq.repeat(self.heads), persistent=False)
        self.norm = ComplexRMSNorm(d_model)
        self.qkv = nn.Linear(d2, 3 * d2, bias=False)
        self.out = nn.Linear(d2, d2, bias=False)
        nn.init.normal_(self.out.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, psi: torch.Tensor, kv: torch.Tensor | None = None, keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi + attention [B, T, 2D], the keys and values of the last window - 1 positions [B, <= W-1, 4D],
        float32, detached: the next window's ``kv``)."""
        B, T, d2 = psi.shape
        with record_function("sem/attention"):
            q, k, v = self.qkv(self.norm(psi)).chunk(3, dim=-1)
            L = 0 if kv is None else kv.shape[1]
            if L:
                k = torch.cat([kv[..., :d2].to(k.dtype), k], 1)
                v = torch.cat([kv[..., d2:].to(v.dtype), v], 1)
            qr, kr = q, k
            if self.rope:  # key j sits at position j, query t at L + t: one table of turns for both
                c2, s2 = self._turns(L + T, k.dtype)
                qr, kr = self._turn(q, c2[L:], s2[L:]), self._turn(k, c2, s2)
            split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [B, h, n, dh]
            if L == 0 and T <= self.window:
                causal = torch.ones(T, T, dtype=torch.bool, device=psi.device).tril()
                y = _attend(split(qr), split(kr), split(v), causal)
            else:
                y = self._banded(split(qr), split(kr), split(v), L, keep)
            out = psi + self.out(y.transpose(1, 2).reshape(B, T, d2)).float()
            after = torch.cat([k, v], -1)[:, -(self.window - 1):] if self.window > 1 else k[:, :0].repeat(1, 1, 2)
            return out, after.detach().float()

    def _turns(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) of position i * rope_freq[d] for positions 0..n-1, [n, D, 2] each:
        (re, im) -> (re cos - im sin, im cos + re sin) is x * (cos, cos) + swap(x) * (-sin, sin), four
        whole-tensor ops each way (per part with a stack: about twice as many)."""
        angle = torch.arange(n, device=self.rope_freq.device, dtype=torch.float32)[:, None, None] \
            * self.rope_freq[:, None]  # [n, D, 1]
        cos, sin = angle.cos(), angle.sin()
        return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)

    @staticmethod
    def _turn(x: torch.Tensor, c2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """x [B, n, 2D] (interleaved Re, Im) with complex channel d of row i turned by the angle of row i
        of the tables ``c2``, ``s2`` [n, D, 2] (``_turns``): only differences of positions reach the
        scores, so rows from any start give the same ones."""
        return (x.unflatten(-1, (-1, 2)) * c2 + x.unflatten(-1, (-1, 2)).flip(-1) * s2).flatten(-2)

    def _banded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: int, keep: torch.Tensor | None
                ) -> torch.Tensor:
        """Queries in blocks of ``window``, each against the keys it may see: memory bounded by the window
        whatever the length (a carried context, a long document). Key j (position j - L) is seen by
        query t when t - window < j - L <= t, and, for a carried key (j < L), where ``keep``."""
        T, W = q.shape[2], self.window
        outs = []
        for a in range(0, T, W):
            b = min(a + W, T)
            lo = max(0, a - W + 1 + L)  # the first key any query of the block sees (index into k)
            t = torch.arange(a, b, device=q.device)[:, None]
            pos = torch.arange(lo, b + L, device=q.device)[None] - L  # key positions
            mask = (pos <= t) & (pos > t - W)  # [nq, nk]
            if keep is not None and L:
                mask = mask & ((pos >= 0) | keep[:, a:b, None])  # [B, nq, nk]
                mask = mask[:, None]
            outs.append(_attend(q[:, :, a:b], k[:, :, lo:b + L], v[:, :, lo:b + L], mask))
        return torch.cat(outs, 2)

    # ------------------------------------------------------------------ one token at a time (decoding)
    # The decoding state is a ring of the last ``window`` keys and values, [2, B, heads, window, dh]
    # float32 (keys, then values): position p's in slot p % window, written in place by ``step``; no
    # copy of the window per token (slots 0..p are the filled ones while p < window: masked).

    def empty_ring(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The ring at a document's start: zeros, [2, B, heads, window, dh]."""
        d2 = self.qkv.in_features
        return torch.zeros(2, batch_size, self.heads, self.window, d2 // self.heads, device=device)

    def ring_from_window(self, kv: torch.Tensor, position: int, batch_size: int, device: torch.device
                         ) -> torch.Tensor:
        """The ring holding ``kv`` [B, L, 4D] (``forward``'s: the keys and values of positions
        position - L .. position - 1, oldest first)."""
        ring = self.empty_ring(batch_size, device)
        L = kv.shape[1]
        if L:
            slots = torch.arange(position - L, position, device=device) % self.window
            ring[:, :, :, slots] = kv.float().unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return ring

    def window_from_ring(self, ring: torch.Tensor, position: int) -> torch.Tensor:
        """``forward``'s carried ``kv`` [B, L, 4D] of the ring after ``position`` tokens, L = min(position,
        window - 1), oldest first."""
        L = min(position, self.window - 1)
        slots = torch.arange(position - L, position, device=ring.device) % self.window
        return ring[:, :, :, slots].permute(1, 3, 0, 2, 4).flatten(2)

    @torch.no_grad()
    def decode_constants(self) -> tuple[torch.Tensor, ...]:
        """(``unit_rms``'s floor, the qkv map [2D, 6D] reading ``unit_rms``'s output (``norm_map``) with the
        queries' columns scaled by dh^-1/2, the output map transposed [2D, 2D], and with ``rope`` the turns
        (cos, sin) of distances 0 .. window - 1, [window, D, 2] each), float32: computed once per decode."""
        d2 = self.qkv.in_features
        with _no_autocast(self.qkv.weight):
            qkv = norm_map(self.norm, self.qkv.weight)  # [2D, 6D]
            qkv[:, :d2] *= (d2 // self.heads) ** -0.5
            turns = self._turns(self.window, torch.float32) if self.rope else ()
            return (norm_floor(self.norm, d2, qkv.device), qkv, self.out.weight.float().t().contiguous(), *turns)

    def step(self, psi: torch.Tensor, ring: torch.Tensor, position: int | torch.Tensor,
             constants: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One token psi [B, 2D] float32 at ``position`` (the tokens before it: an int, or a 0-d int64 tensor
        as a compiled step passes it, so that one graph serves every position) -> psi + attention [B, 2D];
        its key and value are written into ``ring`` (in place). ``constants`` from ``decode_constants``.
        The query reads the whole ring, its unfilled slots masked while position < window - 1: the same
        shapes at every position."""
        B, d2 = psi.shape
        W = self.window
        floor, qkv, out = constants[:3]
        q, kv = (unit_rms(psi, floor) @ qkv).split([d2, 2 * d2], -1)
        new = kv.view(B, 2, self.heads, 1, -1).transpose(0, 1)  # [2, B, heads, 1, dh]
        if isinstance(position, int):
            ring.select(3, position % W).copy_(new[:, :, :, 0])
        else:  # a traced position: an index tensor, no Python int the graph would be specialised to
            ring.index_copy_(3, (position % W).reshape(1), new)
        k, v = (ring[i].view(B * self.heads, W, -1) for i in (0, 1))  # [B heads, W, dh]
        full = isinstance(position, int) and position >= W - 1  # every slot written: nothing to mask
        slots = torch.arange(W, device=psi.device) if self.rope or not full else None
        if self.rope:  # slot s holds position position - d_s: the query turned by d_s meets the key as is
            c2, s2 = constants[3:]
            d = (position - slots) % W
            turned = self._turn(q[:, None].expand(B, W, d2), c2[d], s2[d])  # [B, W, 2D]
            scores = (turned.view(B, W, self.heads, -1).transpose(1, 2).reshape(B * self.heads, W, -1) * k
                      ).sum(-1)[:, None]  # [B heads, 1, W]
        else:
            # q is a slice of the qkv row: for B > 1 with several heads a copy (reshape), for B = 1 a view
            scores = torch.bmm(q.reshape(B * self.heads, 1, -1), k.transpose(1, 2))  # [B heads, 1, W]
        if not full:  # slots position + 1 .. W - 1 are empty
            scores = scores.masked_fill(slots > position, float("-inf"))
        return torch.addmm(psi, torch.bmm(scores.softmax(-1), v).view(B, d2), out)
