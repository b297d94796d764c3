"""Hand-written pieces of SEM's arithmetic: the real [2P, 2Q] form of a complex map on interleaved
(Re, Im) features, and autograd functions whose backwards are cheaper than autograd's (RMS norm, the
SiLU gate, the Born logits). Each forward is bitwise the composite it replaces."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A region in float32 whatever autocast is on for x's device; nothing to enter where autocast is off
    (entering and leaving an autocast context costs 5-10 us: ~1% of a compiled decoding step)."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def real_linear_of(w: torch.Tensor) -> torch.Tensor:
    """Real matrix [2P, 2Q] of a complex [P, Q] map on interleaved (Re, Im) features: F.linear(x, it)."""
    return _real_linear(w.real, w.imag)


def _real_linear(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """real_linear_of(re + i im) from the real parts, without a complex tensor in between (whose .real
    and .imag cost a zero-filled [P, Q, 2] grad each in the backward)."""
    return torch.stack([torch.stack([re, -im], -1), torch.stack([im, re], -1)], 1).flatten(2).flatten(0, 1)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, with a hand-written backward.

    The forward is F.rms_norm's arithmetic (bitwise equal); autograd through that composite costs
    about a dozen passes over [B, T, F], this backward six (two of them read-only matrix-vector
    products): with n = x r, dx = r (g w - n mean(g w n)) and dweight = sum over tokens of g n.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float
                ) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, r = ctx.saved_tensors
        features = x.shape[-1]
        with _no_autocast(x):
            gx = (grad * x).reshape(-1, features)  # [N, F]
            # mean(g w n) per token = r (gx @ w) / F; the weight's grad = sum over tokens of r g x = r^T gx
            coef = (r.pow(3) * (gx @ weight).view_as(r)).div_(-features)  # [..., 1]
            grad_weight = r.view(-1) @ gx if ctx.needs_input_grad[1] else None  # [F]
            return (grad * weight).mul_(r).addcmul_(x, coef), grad_weight, None


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) * value for a = [value | gate] [..., 2H] -> [..., H], autograd's arithmetic (bitwise
    equal) without its last step: through chunk + silu + mul, autograd ends in a cat copying both
    halves' grads into [..., 2H]; this backward writes them into one buffer in place."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor) -> torch.Tensor:
        value, gate = a.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(a, s)
        return s * value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        a, s = ctx.saved_tensors
        value, gate = a.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # writes into a buffer's halves do not trace: one cat (fused there)
            return torch.cat([grad * s, torch.ops.aten.silu_backward(grad * value, gate)], -1)
        grad_a = torch.empty_like(a)
        grad_value, grad_gate = grad_a.chunk(2, dim=-1)
        torch.mul(grad, s, out=grad_value)
        torch.ops.aten.silu_backward.grad_input(grad * value, gate, grad_input=grad_gate)
        return grad_a


class _CausalConv(torch.autograd.Function):
    """pre[b, t, c] = bias[c] + sum_j w[c, j] x[b, t + j, c]: the causal depthwise convolution of k taps
    on x [B, T + k - 1, C] (its first k - 1 rows: the inputs before the window), w [C, k], bias [C];
    features last, as the block holds them. F.conv1d's arithmetic in k multiply-adds over the whole
    tensor: conv1d wants channels first (two transposing copies) and its depthwise backward ran ~4x
    slower than this one on CPU (B 16, T 128, 256 features, k 4, bf16)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor
                ) -> torch.Tensor:
        k = w.shape[-1]
        T = x.shape[1] - k + 1
        taps = w.to(x.dtype)
        pre = torch.addcmul(bias.to(x.dtype), x[:, k - 1:], taps[:, k - 1])
        for j in range(k - 1):
            pre.addcmul_(x[:, j:j + T], taps[:, j])
        ctx.save_for_backward(x, taps)
        ctx.param_dtype = w.dtype
        return pre

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, taps = ctx.saved_tensors
        k, T = taps.shape[-1], grad.shape[1]
        grad = grad.to(x.dtype)
        if torch.compiler.is_compiling():  # writes into slices do not trace: one padded product per tap
            grad_x = sum(F.pad(grad * taps[:, j], (0, 0, j, k - 1 - j)) for j in range(k))
        else:
            grad_x = torch.zeros_like(x)
            for j in range(k):
                grad_x[:, j:j + T].addcmul_(grad, taps[:, j])
        grad_w = torch.stack([(grad * x[:, j:j + T]).sum((0, 1), dtype=torch.float32) for j in range(k)], -1)
        grad_bias = grad.sum((0, 1), dtype=torch.float32)
        return grad_x, grad_w.to(ctx.param_dtype), grad_bias.to(ctx.param_dtype)


class _BornLogits(torch.autograd.Function):
    """power * log(|z_k|^2 + eps) [..., V] from z [..., >= 2V] whose first 2V features are (Re, Im)
    pairs: p_k ~ (|z_k|^2 + eps)^power (``SEMModel``'s ``born_power``; 1 is the Born rule itself).

    Autograd's arithmetic (bitwise equal) with one pass over the [..., V, 2] amplitudes in the backward
    instead of three: d/dz power log(|z|^2 + eps) = 2 power z / (|z|^2 + eps). Features past 2V (padding
    that keeps the readout matmul's width a multiple of 16) get zero grad.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, vocab: int, eps: float,
                power: float = 1.0) -> torch.Tensor:
        # |z|^2 + eps as Re^2 + Im^2 of strided halves: bitwise the same as pow(2).sum(-1), whose
        # reduction over a last dim of size 2 runs ~7x slower on CPU.
        sq = z[..., :2 * vocab].unflatten(-1, (vocab, 2)).square()
        s = (sq[..., 0] + sq[..., 1]).add_(eps)
        ctx.save_for_backward(z, s)
        ctx.vocab, ctx.power = vocab, power
        return torch.log(s) if power == 1.0 else torch.log(s).mul_(power)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, None, None, None]:
        z, s = ctx.saved_tensors
        pairs = (ctx.vocab, 2)
        if torch.compiler.is_compiling():  # as below, without writes into slices (they do not trace)
            amps = z[..., :2 * ctx.vocab].unflatten(-1, pairs) * torch.div(grad, s).mul(2 * ctx.power).unsqueeze(-1)
            return F.pad(amps.flatten(-2), (0, z.shape[-1] - 2 * ctx.vocab)), None, None, None
        grad_z = torch.empty_like(z)
        grad_z[..., 2 * ctx.vocab:].zero_()
        torch.mul(z[..., :2 * ctx.vocab].unflatten(-1, pairs), torch.div(grad, s).mul_(2 * ctx.power).unsqueeze(-1),
                  out=grad_z[..., :2 * ctx.vocab].unflatten(-1, pairs))
        return grad_z, None, None, None
