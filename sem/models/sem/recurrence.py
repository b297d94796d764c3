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
