"""The Signal-Entropic Model (SEM): a complex-valued byte-level language model in pure PyTorch.

Layout of the state: the residual stream psi in C^D is carried as a REAL tensor [B, T, 2D] of
interleaved (Re, Im) pairs, i.e. torch.view_as_real(psi).flatten(-2). Every nn.Parameter is a real
float32 tensor, so AdamW, clipping, DDP and precision
plugins never see complex parameters. Complex64 values are built only inside autocast-disabled regions
(the recurrence and the Cayley propagator), from float32 parts; real matmuls follow autocast.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from sem.contracts import ModelOutput, cross_entropy
from sem.data.tokenizer import ByteTokenizer
from sem.lengths import steps_of
from sem.models.common import check_input_length
from sem.models.sem.attention import LocalAttention
from sem.models.sem.blocks import BlockConstants, ComplexRMSNorm, norm_floor, norm_map, unit_rms
from sem.models.sem.kernels import _BornLogits, _no_autocast, _real_linear
from sem.models.sem.mixers import build_block
from sem.models.sem.propagator import CayleyPropagator
from sem.models.sem.settings import settings_problems

logger = logging.getLogger(__name__)

# ||psi_t||^2 / D of the residual state entering norm_f is clamped to [1/ENERGY_CLAMP, ENERGY_CLAMP]
# before the log, so the per-token penalty log(e)^2 is bounded by log(ENERGY_CLAMP)^2 ~= 84.8 and its
# gradient vanishes beyond the clamp.
ENERGY_CLAMP = 1e4
BOS_ID = ByteTokenizer.bos_id  # a document's first token: a carried state stops there


class SEMModel(nn.Module):
    """Encoder -> N SEMBlocks -> ComplexRMSNorm -> Cayley propagator -> Born (or linear) readout.

    ``conv_width`` k > 0 puts a causal depthwise convolution of k taps and a SiLU on each block's
    recurrence input (after ``in_proj``; ``SEMBlock``); 0 (the default) leaves the block as it was.
    ``modes`` N > 1 gives each recurrence channel N timescales (N complex modes read out by learned
    complex weights: S4D's state size); 1 (the default) is one per channel.
    ``heads`` H > 0 makes each block's state a [K, K] complex matrix per head (K = D / H) written by
    input-dependent keys and read by queries (``retention``: RetNet's retention as SEM's complex
    recurrence, one modulus per head and one phase per key channel); 0 (the default) is the diagonal state.
    ``attention_every`` k > 0 puts causal softmax attention over the last ``attention_window`` positions
    (``LocalAttention``, its own residual sub-layer) before every k-th block (Griffin's recurrence +
    local attention); 0 (the default): none. ``attention_rope``: the attention's queries and keys turned
    by their position (RoPE as a phase on each complex channel); False: no positional encoding.
    """

    # Per-channel parameters (the recurrence's, the convolution's taps): no weight decay, never Muon's.
    no_decay_keywords: ClassVar[tuple[str, ...]] = ("norm", "bias", "gain", "log_A_mag", "theta", "skip_D",
                                                    "conv", "mode_c")
    # >=2-D weights that are not hidden matrices (kept out of Muon): the token table, the readout and
    # the propagator's h_real/h_imag (they parametrise H of U = Cayley(H), not a map on the state).
    non_matrix_keywords: ClassVar[tuple[str, ...]] = ("embed", "propagator", "readout")
    # compile=auto compiles this model's training step in long runs: inductor fuses its elementwise chains
    # (1.12-1.3x the eager step in fp32, 1.5x under bf16; BENCHMARKS.md)
    compile_pays: ClassVar[bool] = True

    def __init__(
        self,
        vocab_size: int = 259,
        d_model: int = 128,
        n_layers: int = 4,
        max_seq_len: int = 2048,
        mlp_ratio: float = 2.0,
        readout: Literal["born", "linear"] = "born",
        unitary_lambda: float = 0.01,
        propagator_warmup_steps: int | None = None,
        propagator_warmup_fraction: float | None = 0.2,
        max_steps: int | None = None,
        recurrence: Literal["fft", "scan"] = "fft",
        gradient_checkpointing: bool = False,
        born_eps: float = 1e-6,
        born_power: float = 1.0,
        born_offset: float = 0.0,
        dropout: float = 0.0,
        conv_width: int = 0,
        r_min: float = math.exp(-1.0),
        r_max: float = math.exp(-1.0 / 1000.0),
        max_phase: float = math.pi,
        selective: bool = False,
        modes: int = 1,
        heads: int = 0,
        attention_every: int = 0,
        attention_window: int = 128,
        attention_rope: bool = False,
    ) -> None:
        bad = settings_problems(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, max_seq_len=max_seq_len, mlp_ratio=mlp_ratio,
            readout=readout, unitary_lambda=unitary_lambda, propagator_warmup_steps=propagator_warmup_steps,
            propagator_warmup_fraction=propagator_warmup_fraction, max_steps=max_steps, recurrence=recurrence,
            born_eps=born_eps, born_power=born_power, born_offset=born_offset, dropout=dropout, conv_width=conv_width,
            r_min=r_min, r_max=r_max, max_phase=max_phase, selective=selective, modes=modes, heads=heads,
            attention_every=attention_every, attention_window=attention_window, attention_rope=attention_rope)
        if bad:
            raise ValueError("; ".join(bad))
        super().__init__()
        self.vocab_size, self.d_model, self.max_seq_len = vocab_size, d_model, max_seq_len
        self.readout_kind, self.unitary_lambda, self.born_eps = readout, unitary_lambda, born_eps
        self.born_power, self.born_offset = float(born_power), float(born_offset)
        # Steps win; else a fraction of max_steps (the run's trainer.max_steps, given by the config node).
        self.propagator_warmup_steps = steps_of(propagator_warmup_steps, propagator_warmup_fraction, max_steps) or 0
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_width, self.selective, self.modes, self.heads = conv_width, selective, modes, heads
        # Set by each forward for probes(), never saved: [B, T] pre-norm energy, [B, T, 2D] output of
        # norm_f and the [2D, 2D] propagator map that the readout applied to it.
        self._last_energy: torch.Tensor | None = None
        self._last_state: tuple[torch.Tensor, torch.Tensor] | None = None

        # Encoder: one [V, 2D] table = Re and Im embeddings side by side; std 1/sqrt(2) -> energy ~ D.
        self.embed = nn.Embedding(vocab_size, 2 * d_model)
        nn.init.normal_(self.embed.weight, std=math.sqrt(0.5))
        self.blocks = nn.ModuleList(
            build_block(d_model, mlp_ratio, recurrence, dropout, n_layers, conv_width, (r_min, r_max, max_phase),
                        selective, modes, heads)
            for _ in range(n_layers)
        )
        # Local attention before every attention_every-th block (Griffin's pattern), keyed by block index.
        self.attention = nn.ModuleDict({
            str(i): LocalAttention(d_model, attention_window, n_layers, attention_rope)
            for i in range(n_layers) if attention_every and (i + 1) % attention_every == 0})
        self.norm_f = ComplexRMSNorm(d_model)
        self.propagator = CayleyPropagator(d_model)
        # Persistent so a loaded checkpoint runs with the alpha it was saved at.
        self.register_buffer("propagator_alpha", torch.tensor(self._alpha(0)))
        if readout == "born":
            # Complex W = w_re + i w_im, [V, D]; std 1/sqrt(2D) -> E|z_k|^2 ~ 1 >> born_eps at init.
            self.readout_re = nn.Parameter(torch.randn(vocab_size, d_model) / math.sqrt(2 * d_model))
            self.readout_im = nn.Parameter(torch.randn(vocab_size, d_model) / math.sqrt(2 * d_model))
            # born_offset c != 0: a learned complex amplitude beta_k per token added before the measurement,
            # z_k = w_k . U psi + beta_k, beta_k = c at init ([V, 2] as interleaved (Re, Im), flattened: no
            # weight decay). A displacement by a reference amplitude, as a local oscillator in homodyne
            # detection: for |beta| >> |w . U psi| the Born log-probability is ~ 2 Re(w . U psi / beta),
            # linear in the state; the model learns how far to go from there.
            if born_offset:
                offset = torch.zeros(vocab_size, 2)
                offset[:, 0] = born_offset
                self.readout_offset = nn.Parameter(offset.flatten())
        else:
            self.readout = nn.Linear(2 * d_model, vocab_size)

    def _alpha(self, step: int) -> float:
        if self.propagator_warmup_steps == 0:
            return 1.0
        return min(1.0, max(0, step) / self.propagator_warmup_steps)

    def set_step(self, step: int) -> None:
        """Propagator blend alpha = min(1, step / propagator_warmup_steps): a pure function of step."""
        self.propagator_alpha.fill_(self._alpha(step))

    @torch.no_grad()
    def probes(self) -> dict[str, float]:
        """Diagnostics of the SEM state, computed on demand (logging steps only), as Python floats.

        Always: ``sem/unitarity_error`` (max |U^H U - I|), ``sem/max_lambda`` (max |lambda| over all
        blocks), ``sem/alpha`` (propagator blend). After a forward, from that forward's batch:
        ``sem/energy_mean`` / ``sem/energy_max`` (pre-norm ||psi_t||^2 / D over tokens) and
        ``sem/phase_coherence`` (mean over tokens of R_t = |mean_d psi_td / |psi_td||, in [0, 1], of the
        state fed to the readout: 1 when all channels share one phase, ~1/sqrt(D) for random phases).
        """
        u = self.propagator.unitary()  # [D, D] complex64
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        out = {
            "sem/unitarity_error": (u.conj().T @ u - eye).abs().max().item(),
            # |lambda| = exp(-decay_rate), [D] per block
            "sem/max_lambda": max(torch.exp(-b.decay_rate()).max().item() for b in self.blocks),
            "sem/alpha": self.propagator_alpha.item(),
        }
        if self._last_energy is not None and self._last_state is not None:
            energy = self._last_energy.float()  # [B, T]
            normed, propagator = self._last_state
            psi = F.linear(normed.float(), propagator).unflatten(-1, (-1, 2)).contiguous()  # [B, T, D, 2]
            z = torch.view_as_complex(psi)  # [B, T, D] complex64
            unit = z / z.abs().clamp_min(1e-12)  # e^{i phase}; a zero channel contributes 0
            out["sem/energy_mean"] = energy.mean().item()
            out["sem/energy_max"] = energy.max().item()
            out["sem/phase_coherence"] = unit.mean(-1).abs().mean().item()
        return out

    def _readout_map(self, propagator: torch.Tensor) -> torch.Tensor:
        """The readout composed with the propagator map [2D, 2D], float32: [2V padded to a multiple of
        16, 2D] Born amplitudes on interleaved features, or the linear readout's [V, 2D] weight.

        Both are per-token linear maps: composing them ([W, 2D] @ [2D, 2D], once) replaces applying the
        propagator to every token ([B*T, 2D] @ [2D, 2D], and two such products in the backward).
        """
        with _no_autocast(propagator):
            if self.readout_kind == "linear":
                return self.readout.weight.float() @ propagator
            w = _real_linear(self.readout_re.float(), self.readout_im.float()) @ propagator  # [2V, 2D]
            return F.pad(w, (0, 0, 0, -w.shape[0] % 16))  # width 518 -> 528: the CPU matmul runs ~1.6x faster

    def _logits(self, psi: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """psi [..., 2D] (output of norm_f), readout from _readout_map -> logits [..., V] float32."""
        if self.readout_kind == "linear":
            return F.linear(psi, readout, self.readout.bias).float()
        # z = W U psi as one real matmul (may run in bf16 under autocast); Born rule p_k ~ |z_k|^2, or
        # with born_power b, p_k ~ |z_k|^(2b): the logits b log(|z_k|^2 + eps).
        z = F.linear(psi, readout).float()
        if self.born_offset:  # in float32: a bf16 offset of ~1 would round z to 2^-7
            z = z + F.pad(self.readout_offset, (0, z.shape[-1] - self.readout_offset.shape[0]))
        return _BornLogits.apply(z, self.vocab_size, self.born_eps, self.born_power)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                state: dict[str, list[torch.Tensor]] | None = None) -> ModelOutput:
        """Logits (and with ``targets`` the loss) of windows ``input_ids`` [B, T].

        ``state``: the ``ModelOutput.state`` of the previous window of the same rows (truncated BPTT,
        ``data.tbptt``): each row continues that context, as ``prefill`` would; from the row's first BOS on
        the carried state is no longer added (a row starting with BOS starts fresh, as a document does in
        ``sem.models.stream``; after a BOS inside the window, the window's earlier tokens still reach it,
        as in independent windows). None: every row starts fresh.
        The output's ``state`` is the state after the window, ``{"h": [B, D] complex64 per block ([B, D, N]
        with ``modes`` N),
        "conv": [B, k-1, 2D] per block (empty without a convolution)}``, detached: gradients stop at
        the window.
        """
        check_input_length(input_ids, self.max_seq_len)
        with record_function("sem/embed"):
            psi = self.embed(input_ids).float()  # [B, T, 2D]
        n = len(self.blocks)
        keep = None
        h, conv, kv = [None] * n, [None] * n, [None] * len(self.attention)
        if state is not None:  # the carried state counts before each row's first BOS
            T = input_ids.shape[1]
            bos = input_ids == BOS_ID
            first = torch.where(bos.any(1), bos.int().argmax(1), T)  # [B]
            keep = torch.arange(T, device=input_ids.device)[None] < first[:, None]  # [B, T]
            h, conv = state["h"], state["conv"] or conv
            kv = [*(state.get("kv") or []), *kv][:len(kv)]
        psi, hs, tails, kvs = self._run(psi, h, conv, kv, keep)
        # The penalty reads the residual state entering norm_f: after the norm (and the unitary
        # propagator) the energy is ~1 by construction and the term would be inert (~1e-11).
        # Not detached: its gradient reaches the blocks and the embedding that write the residual.
        with _no_autocast(psi), record_function("sem/unitary_penalty"):
            energy = psi.float().pow(2).sum(-1) / self.d_model  # [B, T] ||psi_t||^2 / D
            unitary_div = torch.log(energy.clamp(1.0 / ENERGY_CLAMP, ENERGY_CLAMP)).pow(2).mean()
        with record_function("sem/final_norm"):
            psi = self.norm_f(psi)  # [B, T, 2D] float32
        with record_function("sem/propagator"):
            propagator = self.propagator.matrix(self.propagator_alpha)  # [2D, 2D], applied by the readout
        # Detached references for probes(): the statistics are computed there on demand.
        self._last_energy, self._last_state = energy.detach(), (psi.detach(), propagator.detach())
        with record_function("sem/readout"):
            logits = self._logits(psi, self._readout_map(propagator))
        after = {"h": [h.detach() for h in hs], "conv": tails, "kv": kvs}
        # The penalty is the SEM's own loss term (train/unitary_penalty); train/unitary_div logs it unweighted.
        penalty = {"unitary_penalty": self.unitary_lambda * unitary_div}
        if targets is None:
            return ModelOutput(logits, state=after, aux_losses=penalty, metrics={"unitary_div": unitary_div})
        with record_function("sem/cross_entropy"):
            ce = cross_entropy(logits, targets)
        return ModelOutput(logits, ce + penalty["unitary_penalty"], ce, state=after, aux_losses=penalty,
                           metrics={"unitary_div": unitary_div})

    def _run(self, psi: torch.Tensor, h: list[torch.Tensor | None], conv: list[torch.Tensor | None],
             kv: list[torch.Tensor | None], keep: torch.Tensor | None = None,
             decode: tuple[int | torch.Tensor, list[BlockConstants], list[tuple[torch.Tensor, ...]]] | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The one loop over the layers (an attention layer where there is one, then the block) for the
        forward, ``prefill`` and ``step``, from a carried state: per block its recurrence state ``h`` and
        convolution tail ``conv``, per attention layer its keys and values ``kv`` (None: a document's
        start), counting where ``keep`` [B, T] (None: everywhere).

        ``decode`` None: psi [B, T, 2D] in one parallel pass, ``kv`` in ``LocalAttention.forward``'s layout.
        ``decode``, (position, per block and per attention layer its per-decode constants) of a DecodeState:
        psi is one token [B, 2D] (no autograd, no profiler labels: per-token dispatch is the cost); ``kv``
        are its rings, written in place. Returns (psi, per block the recurrence state after, per block the convolution tail after
        (empty without a convolution), per attention layer its keys and values after)."""
        hs, tails, kvs = [], [], []
        for i, block in enumerate(self.blocks):
            if str(i) in self.attention:
                attention, j = self.attention[str(i)], len(kvs)
                if decode is not None:
                    psi, after = attention.step(psi, kv[j], decode[0], decode[2][j]), kv[j]
                else:
                    psi, after = attention(psi, kv[j], keep)
                kvs.append(after)
            if decode is not None:
                psi, state, tail = block.step(psi, h[i], decode[1][i], conv[i])
            else:
                with record_function(f"sem/block{i}"):
                    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                        psi, state, u = checkpoint(block, psi, h[i], conv[i], keep, use_reentrant=False)
                    else:
                        psi, state, u = block(psi, h[i], conv[i], keep)
                if self.conv_width:
                    before = conv[i] if conv[i] is not None else block.empty_tail(psi.shape[0], psi.device)
                    tail = self._next_tail(before, u)
            hs.append(state)
            if self.conv_width:
                tails.append(tail)
        return psi, hs, tails, kvs

    @staticmethod
    def _next_tail(tail: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A convolution's last k-1 inputs after reading u [B, T, 2D] from ``tail`` [B, k-1, 2D]."""
        keep = tail.shape[1]  # k - 1
        return torch.cat([tail, u[:, -keep:].detach().float()], 1)[:, -keep:] if keep else tail

    # ------------------------------------------------------------------ recurrent decoding

    @torch.no_grad()
    def decode_state(self, batch_size: int = 1, compile: bool = False) -> DecodeState:
        """A fresh (empty-context) decoding state on the model's device, with the per-decode constants.
        ``compile``: ``step`` runs one ``torch.compile``d graph for every position (the position passed as
        a tensor): on CPU 0.54-0.62 ms a token against 0.94-1.10 eager for sem_small on one thread, after a
        cold compile of ~16 s (``python -m bench.decode``), so it pays back over long generations only."""
        device = self.embed.weight.device
        with _no_autocast(self.embed.weight):
            readout = self._readout_map(self.propagator.matrix(self.propagator_alpha))
            if self.readout_kind == "linear":
                bias = self.readout.bias.float()
            elif self.born_offset:
                bias = F.pad(self.readout_offset.float(), (0, readout.shape[0] - self.readout_offset.shape[0]))
            else:
                bias = torch.zeros(readout.shape[0], device=device)
            return DecodeState(
                h=[torch.view_as_real(b.empty_state(batch_size, device)) for b in self.blocks],
                blocks=[b.decode_constants() for b in self.blocks],
                readout=readout,
                conv=[b.empty_tail(batch_size, device) for b in self.blocks] if self.conv_width else [],
                kv=[a.empty_ring(batch_size, device) for a in self.attention.values()],
                attend=[a.decode_constants() for a in self.attention.values()],
                final=(norm_floor(self.norm_f, 2 * self.d_model, device), norm_map(self.norm_f, readout), bias,
                       torch.tensor(math.sqrt(self.born_eps), device=device)),
                advance=torch.compile(self._advance, dynamic=False) if compile else None)

    @torch.no_grad()
    def step(self, token: torch.Tensor, state: DecodeState | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Next-token logits [B, V] float32 after ``token`` [B], and the advanced state. O(1) time and
        memory per token, any context length (no max_seq_len: the recurrence has no window). No
        ``state``: a fresh one (``decode_state``), as at the start of a document. In float32, autocast
        or not. The attention layers' rings are advanced in place (``DecodeState``)."""
        if state is None:
            state = self.decode_state(token.shape[0])
        position: int | torch.Tensor = state.position
        advance = self._advance
        if state.advance is not None:  # compiled: the position as a tensor, so no graph is specialised to it
            advance, position = state.advance, torch.tensor(position, device=token.device)
        with _no_autocast(token):
            logits, hs, tails = advance(token, state.h, state.conv or [None] * len(self.blocks), state.kv, position,
                                        state.blocks, state.attend, state.final)
        return logits, replace(state, h=hs, position=state.position + 1, conv=tails)

    def _advance(self, token: torch.Tensor, h: list[torch.Tensor], conv: list[torch.Tensor | None],
                 kv: list[torch.Tensor], position: int | torch.Tensor, blocks: list[BlockConstants],
                 attend: list[tuple[torch.Tensor, ...]], final: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``step``'s arithmetic on the state's parts: (logits [B, V], per block h and conv tail after);
        the rings ``kv`` are written in place. A function of tensors and the position only, so that
        ``torch.compile`` (``decode_state(compile=True)``) traces it once."""
        psi = F.embedding(token, self.embed.weight)  # [B, 2D]
        psi, hs, tails, _ = self._run(psi, h, conv, kv, decode=(position, blocks, attend))
        floor, readout, bias, eps = final
        z = torch.addmm(bias, unit_rms(psi, floor), readout)  # [B, 2V (padded) or V]
        if self.readout_kind == "linear":
            return z, hs, tails
        # Born: power log(|z_k|^2 + eps) = 2 power log(hypot(|z_k|, sqrt(eps)))
        amplitude = torch.linalg.vector_norm(z[:, :2 * self.vocab_size].view(z.shape[0], -1, 2), dim=-1)
        return torch.hypot(amplitude, eps).log_().mul_(2 * self.born_power), hs, tails

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, state: DecodeState | None = None, all_logits: bool = False
                ) -> tuple[torch.Tensor, DecodeState]:
        """Consume tokens [B, T] in one parallel pass (the scan), from ``state`` (None: a fresh one, a
        document's start), returning the last position's logits [B, V] (``all_logits``: every
        position's, [B, T, V]) and the state after it: the same as T calls of step(), much faster.

        A carried state continues its context in parallel too (each block's recurrence adds
        lambda^(t+1) h0; a convolution reads its input tail), so prefilling a sequence chunk by chunk
        gives the same logits as one prefill over all of it, in memory bounded by the chunk: how
        ``sem.models.stream`` scores documents of any length.
        """
        B, T = input_ids.shape
        if state is None:
            state = self.decode_state(B)
        carried = state.position > 0  # a fresh state's h is zero: skip adding lambda^(t+1) * 0
        attention = list(self.attention.values())
        psi = self.embed(input_ids).float()  # [B, T, 2D]
        psi, hs, tails, kvs = self._run(
            psi, [torch.view_as_complex(h) for h in state.h] if carried else [None] * len(self.blocks),
            state.conv or [None] * len(self.blocks),
            [a.window_from_ring(r, state.position) if carried else None for a, r in zip(attention, state.kv)])
        position = state.position + T
        rings = [a.ring_from_window(kv, position, B, input_ids.device) for a, kv in zip(attention, kvs)]
        # Own memory: a view of the pass's [B, T, ...] tensors would keep them alive (a compiled step takes
        # a prefill's state and its own, laid out by inductor, as two graphs: strides are guarded).
        own = lambda x: x.clone(memory_format=torch.contiguous_format)  # noqa: E731
        state = replace(state, h=[own(torch.view_as_real(h)) for h in hs], position=position,
                        conv=[own(t) for t in tails], kv=rings)
        psi = self.norm_f(psi if all_logits else psi[:, -1])
        return self._logits(psi.float(), state.readout), state


@dataclass
class DecodeState:
    """Recurrent decoding state of an SEMModel, constant in the context length, so that a step costs the
    same at token 10 and at token 10^6: per block its recurrence state as real pairs (``torch.view_as_real``
    of ``empty_state``'s complex64 [B, D], [B, D, N] with ``modes`` N, [B, H, K, K] with ``heads``: a
    compiled step's graph then holds no complex tensor, which inductor cannot fuse) and with
    ``conv_width`` k its last k-1 convolution inputs; per attention layer a ring of its last
    ``attention_window`` keys and values; and per-decode constants computed from the parameters once
    (``decode_state``), not per token.

    ``step`` writes the attention rings in place: continue from the state it returns (an earlier state
    shares the rings; ``clone()`` one to branch from it)."""

    h: list[torch.Tensor]
    blocks: list[BlockConstants]  # per block: SEMBlock.decode_constants (norm weight, conv taps, lambda, ...)
    readout: torch.Tensor  # SEMModel._readout_map: readout after (1 - alpha) I + alpha U, [2V (padded) or V, 2D]
    position: int = 0  # tokens consumed
    # With model.conv_width k > 0: per block the last k-1 recurrence inputs before the convolution,
    # [B, k-1, 2D] float32 (zeros at a document's start); empty without a convolution.
    conv: list[torch.Tensor] = field(default_factory=list)
    # With model.attention_every: per attention layer the ring of its keys and values
    # (LocalAttention.empty_ring: [2, B, heads, attention_window, dh] float32, keys then values; position p
    # in slot p % window).
    kv: list[torch.Tensor] = field(default_factory=list)
    attend: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # LocalAttention.decode_constants
    # step's readout: unit_rms's floor for norm_f, ``readout`` as a map [2D, 2V (padded) or V] reading
    # unit_rms's output (blocks.norm_map), its bias (the Born offset, padded; the linear readout's bias; zeros
    # without one) and sqrt(born_eps), 0-d
    final: tuple[torch.Tensor, ...] = ()
    # decode_state(compile=True): SEMModel._advance compiled (one graph for every position); None: eager
    advance: Callable[..., tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] | None = None

    def clone(self) -> DecodeState:
        """A state that evolves apart from this one (the constants shared: they are never written)."""
        return replace(self, h=[h.clone() for h in self.h], conv=[c.clone() for c in self.conv],
                       kv=[r.clone() for r in self.kv])
