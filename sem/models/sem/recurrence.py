"""The diagonal complex linear recurrence h_t = lambda h_{t-1} + gamma u_t, evaluated in parallel over
time: by FFT convolution (``recurrence_fft``) or a two-level chunked scan (``recurrence_scan``), never a
Python loop over t. Pure functions of (input, log lambda, gamma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk length of the two-level scan: intra-chunk [C, C] and inter-chunk [T/C, T/C] decay matrices.
SCAN_CHUNK = 16
MIN_DECAY = 1e-6


def recurrence_fft(x: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor | None = None,
                   c: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = gamma * sum_{s<=t} lambda^(t-s) u_s by FFT convolution. x [B, T, D, 2] float32 (interleaved
    Re/Im), gamma [D] real input scale (None: 1), returns [B, T, D, 2].

    Several modes per channel: log_lam, gamma [D, N] and c [D, N] complex give y_t = sum_n c_n h_t^(n),
    one mode h^(n) per timescale; the N modes fold into one [D, T] kernel (S4D's trick), so the
    batch's FFTs cost what one mode's do. O(T log T) but leaks round-off across time (~1e-4 relative
    at fp32).
    """
    u = torch.view_as_complex(x.contiguous())  # [B, T, D] complex64
    T = u.shape[1]
    n = 1 << (2 * T - 1).bit_length()  # >= 2T-1: linear, not circular, convolution
    k = torch.arange(T, device=u.device, dtype=torch.float32)
    if log_lam.ndim == 2:  # [D, N] modes: sum_n c_n gamma_n lambda_n^k
        weight = c if gamma is None else c * gamma
        kernel = (torch.exp(log_lam[..., None] * k) * weight[..., None]).sum(1)  # [D, T]
    else:
        kernel = torch.exp(log_lam[:, None] * k[None, :])  # [D, T] lambda^k
    if gamma is not None and log_lam.ndim == 1:  # folded into the [D, T] kernel: no pass over [B, T, D]
        kernel = kernel * gamma[:, None]
    # Time as the last, contiguous dim: an FFT along dim 1 would transpose-copy internally each time.
    spec = torch.fft.fft(u.transpose(1, 2), n=n, dim=-1) * torch.fft.fft(kernel, n=n, dim=-1)  # [B, D, n]
    h = torch.fft.ifft(spec, dim=-1)[..., :T].transpose(1, 2).contiguous()  # [B, T, D] complex64
    return torch.view_as_real(h)


def _decay_matrix(n: int, log_lam: torch.Tensor, stride: int, shift: int) -> torch.Tensor:
    """M[d, i, j] = lambda_d^(stride * (i - j - shift)) where i - j - shift >= 0, else 0. [D, n, n] complex."""
    idx = torch.arange(n, device=log_lam.device)
    diff = idx[:, None] - idx[None, :] - shift  # [n, n]
    powers = torch.exp((diff.clamp(min=0) * stride).to(torch.float32)[None] * log_lam[:, None, None])
    return torch.where((diff >= 0)[None], powers, torch.zeros((), dtype=powers.dtype, device=powers.device))


def _right_real(m: torch.Tensor) -> torch.Tensor:
    """Real form [G, 2P, 2Q] of z -> z m for a complex batch m [G, P, Q] acting on row vectors z of
    interleaved (Re, Im) pairs: (x + iy)(a + ib) = (xa - yb) + i(xb + ya)."""
    G, P, Q = m.shape
    a, b = m.real, m.imag
    return torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], 2).view(G, 2 * P, 2 * Q)


def recurrence_scan(x: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor | None = None,
                    chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """Same recurrence as recurrence_fft, as a two-level chunked scan of real batched matmuls.

    x [B, T, D, 2] float32 (interleaved Re/Im), gamma [D] or None; returns the same layout. No loop
    over time: within a chunk of C steps h = L u with L[c, s] = lambda^(c-s); chunk-final states are
    carried across the T/C chunks by a second matrix of powers of lambda^C. Exact up to ordinary
    matmul round-off (nothing leaks from the future). Complex products are written as real bmm on
    interleaved (Re, Im) rows because complex bmm on CPU falls back to a per-matrix loop.
    """
    B, T, D, _ = x.shape
    C = min(chunk, T)
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))  # zero inputs after the end change nothing before it
    # One transpose of complex elements (8-byte pairs stay together: ~3x cheaper than a 5-D permute of
    # floats): per channel d a [B*N, C] matrix of row vectors, (c, re|im) interleaved.
    u = torch.view_as_complex(x.contiguous()).view(B * N * C, D).t().contiguous()  # [D, (b, n, c)]
    u = torch.view_as_real(u).view(D, B * N, 2 * C)
    intra = _decay_matrix(C, log_lam, 1, 0).transpose(1, 2)  # [D, s, c] = lambda^(c-s), s <= c
    if gamma is not None:  # folded into the [D, C, C] matrix rather than a pass over x
        intra = intra * gamma[:, None, None]
    h = torch.bmm(u, _right_real(intra))  # [D, B*N, 2C], zero carry-in
    if N > 1:
        ends = h.view(D, B, N, C, 2)[:, :, :, -1].reshape(D, B, 2 * N)  # chunk-final states [D, b, (m, re|im)]
        inter = _decay_matrix(N, log_lam, C, 1).transpose(1, 2)  # [D, m, n] = lambda^(C(n-1-m)), m < n
        carry = torch.bmm(ends, _right_real(inter)).view(D, B * N, 2)  # state entering chunk n
        steps = torch.arange(1, C + 1, device=x.device, dtype=torch.float32)
        p = torch.exp(steps[None] * log_lam[:, None])[:, None]  # [D, 1, C] lambda^(c+1)
        h = torch.baddbmm(h, carry, _right_real(p))
    h = torch.view_as_complex(h.view(D, B * N * C, 2)).t().contiguous()  # [(b, n, c), D] complex64
    return torch.view_as_real(h).view(B, N * C, D, 2)[:, :T]


# The selective scan's per-step decay floor: |a_t| >= exp(-SELECTIVE_MAX_RATE) (0.7%: a state that fast is
# forgotten within a token anyway), so that exp(-L) over a chunk of SCAN_CHUNK steps stays below e^80,
# inside float32's range (e^88).
SELECTIVE_MAX_RATE = 80.0 / SCAN_CHUNK


def recurrence_selective(w: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The input-dependent recurrence h_t = a_t h_{t-1} + w_t, a_t = exp(log_a_t), as a chunked scan.

    Within a chunk of C = SCAN_CHUNK steps, with L the chunk's cumulative log a (Re(log a) clamped to
    >= -SELECTIVE_MAX_RATE), h_t = exp(L_t) * sum_{s<=t} exp(-L_s) w_s: two cumulative sums, O(T D),
    in real arithmetic (complex elementwise kernels are ~2.5x slower on CPU); the chunk-final states
    are carried across the T/C chunks by a short loop. w, log_a [B, T, D] complex64, h0 [B, D]
    complex64 or None (zero); returns h [B, T, D] complex64.
    """
    B, T, D = w.shape
    C = min(SCAN_CHUNK, T)
    N = -(-T // C)
    ell, phi, x = log_a.real.clamp(min=-SELECTIVE_MAX_RATE), log_a.imag, torch.view_as_real(w)
    if N * C != T:  # padding: a_t = 1, w_t = 0 after the end change nothing before it
        ell, phi = (F.pad(t, (0, 0, 0, N * C - T)) for t in (ell, phi))
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))
    ell, phi = ell.view(B, N, C, D).cumsum(2), phi.view(B, N, C, D).cumsum(2)
    wr, wi = x.view(B, N, C, D, 2).unbind(-1)
    cos, sin = torch.cos(phi), torch.sin(phi)
    back = torch.exp(-ell)  # <= e^80 (not 1 / exp(L): its gradient, -1/exp(L)^2, overflows)
    sr = (back * (wr * cos + wi * sin)).cumsum(2)  # sum_s exp(-L_s) w_s, real and imaginary parts
    si = (back * (wi * cos - wr * sin)).cumsum(2)
    mag = torch.exp(ell)
    er, ei = mag * cos, mag * sin  # exp(L_t)
    hr, hi = sr * er - si * ei, sr * ei + si * er
    if N > 1 or h0 is not None:  # carry each chunk's final state into the next: + exp(L_t) h_in
        rows_r, rows_i = [], []
        cr, ci = (None, None) if h0 is None else (h0.real[:, None], h0.imag[:, None])
        for n in range(N):
            r, i = hr[:, n], hi[:, n]
            if cr is not None:
                r, i = r + er[:, n] * cr - ei[:, n] * ci, i + er[:, n] * ci + ei[:, n] * cr
            rows_r.append(r)
            rows_i.append(i)
            cr, ci = r[:, -1:], i[:, -1:]
        hr, hi = torch.stack(rows_r, 1), torch.stack(rows_i, 1)
    return torch.complex(hr, hi).view(B, N * C, D)[:, :T]


# Chunk length of the retention: one chunk covers a training window of 128 tokens (no loop), longer
# inputs (streaming) loop over chunks carrying the [H, K, V] state.
RETENTION_CHUNK = 128


Pair = tuple[torch.Tensor, torch.Tensor]  # a complex tensor as contiguous real (Re, Im) parts


def _turn(x: Pair, cos: torch.Tensor, sin: torch.Tensor) -> Pair:
    """x e^(-i phi) for cos phi, sin phi."""
    return x[0] * cos + x[1] * sin, x[1] * cos - x[0] * sin


def _conj_mm(a: Pair, b: Pair) -> Pair:
    """conj(a) @ b in real matmuls."""
    return a[0] @ b[0] + a[1] @ b[1], a[0] @ b[1] - a[1] @ b[0]


def retention(q: Pair, k: Pair, v: Pair, log_gamma: torch.Tensor, theta: torch.Tensor,
              s0: torch.Tensor | None = None, keep: torch.Tensor | None = None, chunk: int = RETENTION_CHUNK
              ) -> tuple[Pair, torch.Tensor]:
    """The diagonal complex recurrence with a matrix state per head: S_t = diag(lambda) S_{t-1} + k_t v_t^T,
    y_t = S_t^T conj(q_t), i.e. y_t = sum_{s<=t} sum_i conj(q_ti) lambda_i^(t-s) k_si v_s, with
    lambda_i = exp(log_gamma_h + i theta_i) (one modulus per head, one phase per key channel: RetNet's
    retention, written as SEM's complex recurrence; SEM's own is the case K = V = 1 with q = k = 1).

    q, k (Re, Im) [B, T, H, K] and v [B, T, H, V] float32; log_gamma [H] (< 0), theta [H, K]. ``s0``
    [B, H, K, V] complex64: the state before the first step (None: zero); it adds conj(q_t) lambda^(t+1) s0
    at step t where ``keep`` [B, T] (None: everywhere). Returns (y (Re, Im) [B, T, H, V], the state after
    the last step [B, H, K, V] complex64, detached). Within a chunk of C steps the phases turn q and k
    (q~_c = q_c e^(-i theta c)) so that the scores conj(q~) k~ take a real decay mask gamma^(c-s):
    attention's two matmuls, in real arithmetic (complex bmm and the backward of .real/.imag views
    are slow on CPU); a loop over the T / C chunks carries the state.
    """
    B, T, H, K = q[0].shape
    V = v[0].shape[-1]
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, *] -> [B, H, N, C, *], zeros before the start
        x = x.transpose(1, 2)
        return (F.pad(x, (0, 0, pad, 0)) if pad else x).reshape(B, H, N, C, x.shape[-1])

    qc, kc, vc = ((chunks(x[0]), chunks(x[1])) for x in (q, k, v))
    pos = torch.arange(C, device=theta.device, dtype=torch.float32)
    angle = theta[:, None, :] * pos[:, None]  # [H, C, K]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [H, 1, C, K]
    qt, kt = _turn(qc, cos, sin), _turn(kc, cos, sin)
    diff = pos[:, None] - pos[None, :]  # c - s
    mask = torch.where(diff >= 0, torch.exp(diff.clamp(min=0) * log_gamma[:, None, None]), 0.0)[:, None]  # [H, 1, C, C]
    # [Re | Im] of conj(q~) k~^T, then of (scores * mask) @ v: two real matmuls.
    scores = torch.cat(qt, -1) @ torch.cat([torch.cat(kt, -1), torch.cat([kt[1], -kt[0]], -1)], -2).transpose(-1, -2)
    y = (scores * mask.repeat(1, 1, 1, 2)) @ torch.cat([torch.cat(vc, -1), torch.cat([-vc[1], vc[0]], -1)], -2)
    yr, yi = y[..., :V].float(), y[..., V:].float()  # [B, H, N, C, V]

    # Chunk j's own state after its last step: e^(i theta (C-1)) sum_s gamma^(C-1-s) k~_s v_s^T [B, H, N, K, V].
    # Only a later chunk reads it with gradients; the state after the window is detached.
    with torch.set_grad_enabled(torch.is_grad_enabled() and N > 1):
        w = torch.exp((C - 1 - pos) * log_gamma[:, None])[:, None, :, None]  # [H, 1, C, 1]
        kw = [(x * w).transpose(-1, -2).contiguous() for x in kt]  # [B, H, N, K, C]
        own = torch.complex(*(t.float() for t in _conj_mm((kw[0], -kw[1]), vc)))
        own = own * torch.exp(1j * theta * (C - 1))[:, None, :, None]
    lam_log = torch.complex(log_gamma[:, None].expand_as(theta), theta)  # [H, K] log lambda
    lam_c = torch.exp(C * lam_log)[..., None]  # [H, K, 1] lambda^C
    last = own[:, :, 0]
    if N > 1:  # chunk j reads the state entering it as conj(q_c) lambda^(c+1) = gamma^(c+1) conj(q~_c e^(-i theta))
        ahead = torch.exp((pos + 1) * log_gamma[:, None])[:, None, :, None]  # [H, 1, C, 1]
        reads = _turn(qt, theta.cos()[:, None, None], theta.sin()[:, None, None])
        reads = reads[0] * ahead, reads[1] * ahead
        outs_r, outs_i = [yr[:, :, 0]], [yi[:, :, 0]]
        for j in range(1, N):
            r, i = _conj_mm((reads[0][:, :, j], reads[1][:, :, j]), (last.real.contiguous(), last.imag.contiguous()))
            outs_r.append(yr[:, :, j] + r.float())
            outs_i.append(yi[:, :, j] + i.float())
            last = lam_c * last + own[:, :, j]
        yr, yi = torch.stack(outs_r, 2), torch.stack(outs_i, 2)
    yr, yi = (t.reshape(B, H, N * C, V)[:, :, pad:].transpose(1, 2) for t in (yr, yi))  # [B, T, H, V]
    last = last.detach()
    if s0 is not None:
        t1 = torch.arange(1, T + 1, device=theta.device, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
        ahead = torch.exp(t1 * log_gamma[:, None])  # [T, H, 1]
        a = _turn(q, torch.cos(t1 * theta), torch.sin(t1 * theta))  # q e^(-i theta (t+1)), [B, T, H, K]
        a = (a[0] * ahead).transpose(1, 2), (a[1] * ahead).transpose(1, 2)  # [B, H, T, K]
        r, i = _conj_mm(a, (s0.real.contiguous(), s0.imag.contiguous()))  # [B, H, T, V]
        r, i = r.float().transpose(1, 2), i.float().transpose(1, 2)
        if keep is not None:
            r, i = r * keep[:, :, None, None], i * keep[:, :, None, None]
        yr, yi = yr + r, yi + i
        carry = torch.exp(T * lam_log.detach())[..., None] * s0
        last = last + (carry if keep is None else carry * keep[:, -1, None, None, None])
    return (yr, yi), last
