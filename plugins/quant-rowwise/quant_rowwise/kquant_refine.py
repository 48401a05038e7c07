"""convcore's refinement of a k-quant super-block after llama.cpp's search.

For q4_K/q5_K/q2_K (affine: value = d*sc*q - dmin*m) a least-squares refit of the two f16
super-scales and +-1 steps of each sub-scale and sub-min; for q3_K/q6_K (symmetric:
value = d*sc*q) the integer sub-scale nearest each sub-block's least-squares optimum. A
change is kept only when it lowers that (sub-)block's squared error, weighted as
llama.cpp's own search weighs it: ``affine_refine`` / ``sym_refine`` with its weights for
the type without an importance matrix, ``affine_refine_w`` / ``sym_refine_w`` with the
weights the caller gives (an importance matrix's).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import F0, F1, FM, f16_to_f32, f32_to_f16, rint_clamp


@njit(nogil=True, cache=True, fastmath=FM)
def _affine_sse(x, wt, o, n, dl, ml, nmax):
    """Weighted squared error of x[o:o+n] coded as dl*q - ml with the nearest q in 0..nmax."""
    s = F0
    if dl == F0:
        for i in range(n):
            e = -ml - x[o + i]
            s += wt[o + i] * e * e
        return np.float64(s)
    idl = F1 / dl
    fmax = np.float32(nmax)
    for i in range(n):
        v = x[o + i]
        q = min(max(np.rint((v + ml) * idl), F0), fmax)
        e = dl * q - ml - v
        s += wt[o + i] * e * e
    return np.float64(s)


@njit(nogil=True, cache=True, fastmath=FM)
def _sym_sse(x, wt, o, n, dl, qlo, qhi):
    """Weighted squared error of x[o:o+n] coded as dl*q with the nearest q in qlo..qhi."""
    s = F0
    if dl == F0:
        for i in range(n):
            s += wt[o + i] * x[o + i] * x[o + i]
        return np.float64(s)
    idl = F1 / dl
    flo = np.float32(qlo)
    fhi = np.float32(qhi)
    for i in range(n):
        v = x[o + i]
        q = min(max(np.rint(v * idl), flo), fhi)
        e = dl * q - v
        s += wt[o + i] * e * e
    return np.float64(s)


@njit(nogil=True, cache=True, fastmath=FM)
def affine_refine(x, nsub, sub, nmax, smax, st, sc, mi, err, iters, wt):
    """Improve (d, dmin, sc[], mi[]) of an affine super-block x[0:nsub*sub] with codes
    0..nmax and sub-scales/sub-mins 0..smax; keeps only improvements. ``iters`` rounds.

    st: int32[2], the f16 bits of d and dmin (in/out); sc, mi: int32[nsub], the integer
    sub-scales and sub-mins (in/out); err: float64[2*nsub] scratch, [0:nsub] each
    sub-block's weighted squared error now, [nsub:2*nsub] the same under a candidate
    (d, dmin); wt: float32[nsub*sub] scratch, each value's weight.
    """
    # llama.cpp's importance weights for this type (what its own search minimises), so a
    # change is kept only when it helps by llama.cpp's measure too: q4_K/q5_K weigh each
    # value by the sub-block's RMS plus |x|, q2_K by |x|.
    for j in range(nsub):
        av = F0
        if sub == 32:
            for i in range(sub):
                av += x[j * sub + i] * x[j * sub + i]
            av = np.float32(np.sqrt(av / np.float32(sub)))
        for i in range(sub):
            wt[j * sub + i] = av + abs(x[j * sub + i])
    affine_refine_w(x, nsub, sub, nmax, smax, st, sc, mi, err, iters, wt)


@njit(nogil=True, cache=True, fastmath=FM)
def affine_refine_w(x, nsub, sub, nmax, smax, st, sc, mi, err, iters, wt):
    """affine_refine with the caller's weights: wt[0:nsub*sub] (in) weighs each value's
    squared error (an importance matrix's, say); the other arguments as affine_refine's."""
    D = f16_to_f32(st[0])
    Dm = f16_to_f32(st[1])
    total = 0.0
    for j in range(nsub):
        err[j] = _affine_sse(x, wt, j * sub, sub, D * np.float32(sc[j]), Dm * np.float32(mi[j]), nmax)
        total += err[j]
    for _ in range(iters):
        # Least-squares refit of the two f16 super-scales with codes and sub-scales fixed.
        saa = 0.0
        sab = 0.0
        sbb = 0.0
        sax = 0.0
        sbx = 0.0
        for j in range(nsub):
            dl = D * np.float32(sc[j])
            ml = Dm * np.float32(mi[j])
            fb = np.float64(mi[j])
            for i in range(sub):
                v = x[j * sub + i]
                ww = np.float64(wt[j * sub + i])
                q = 0
                if dl != F0:
                    q = rint_clamp((v + ml) / dl, 0, nmax)
                a = np.float64(sc[j] * q)
                saa += ww * a * a
                sab += ww * a * fb
                sbb += ww * fb * fb
                sax += ww * a * v
                sbx += ww * fb * v
        det = saa * sbb - sab * sab
        if det > 1e-30 * saa * sbb and det > 0.0:
            nd = (sax * sbb - sbx * sab) / det
            ndm = (sax * sab - sbx * saa) / det
            h0 = f32_to_f16(np.float32(nd))
            h1 = f32_to_f16(np.float32(ndm))
            if h0 != st[0] or h1 != st[1]:
                D2 = f16_to_f32(h0)
                Dm2 = f16_to_f32(h1)
                t2 = 0.0
                for j in range(nsub):
                    err[nsub + j] = _affine_sse(x, wt, j * sub, sub, D2 * np.float32(sc[j]),
                                                Dm2 * np.float32(mi[j]), nmax)
                    t2 += err[nsub + j]
                if t2 < total:
                    st[0] = h0
                    st[1] = h1
                    D = D2
                    Dm = Dm2
                    total = t2
                    for j in range(nsub):
                        err[j] = err[nsub + j]
        # Integer sub-scale and sub-min steps, each sub-block on its own.
        for j in range(nsub):
            bs = sc[j]
            bm = mi[j]
            be = err[j]
            for ds in range(-1, 2):
                s2 = sc[j] + ds
                if s2 < 0 or s2 > smax:
                    continue
                for dm in range(-1, 2):
                    m2 = mi[j] + dm
                    if m2 < 0 or m2 > smax or (ds == 0 and dm == 0):
                        continue
                    e = _affine_sse(x, wt, j * sub, sub, D * np.float32(s2), Dm * np.float32(m2), nmax)
                    if e < be:
                        be = e
                        bs = s2
                        bm = m2
            total += be - err[j]
            err[j] = be
            sc[j] = bs
            mi[j] = bm


@njit(nogil=True, cache=True, fastmath=FM)
def sym_refine(x, nsub, sub, qlo, qhi, slo, shi, st, sc, L, wt):
    """Improve the sub-block scales of a symmetric super-block; keeps only improvements.

    Per sub-block: one pass gives its error and the least-squares scale for its codes;
    the integer scale nearest that optimum (or the neighbour towards it) is tried.
    (No least-squares refit of d, as the affine types get: here it barely lowers the error.)
    Writes the final codes ``q - qlo`` to ``L`` (sub-blocks with a zero scale keep theirs).

    Codes qlo..qhi, integer sub-scales slo..shi. st: int32[1+], st[0] the f16 bits of d
    (in); sc: int32[nsub] sub-scales (in/out); L: int32[nsub*sub] codes (out);
    wt: float32[nsub*sub] scratch, each value's weight.
    """
    if f16_to_f32(st[0]) == F0:
        return
    # llama.cpp's weights for q3_K/q6_K (x squared), as its own scale search uses
    for i in range(nsub * sub):
        wt[i] = x[i] * x[i]
    sym_refine_w(x, nsub, sub, qlo, qhi, slo, shi, st, sc, L, wt)


@njit(nogil=True, cache=True, fastmath=FM)
def sym_refine_w(x, nsub, sub, qlo, qhi, slo, shi, st, sc, L, wt):
    """sym_refine with the caller's weights: wt[0:nsub*sub] (in) weighs each value's
    squared error; the other arguments as sym_refine's."""
    D = f16_to_f32(st[0])
    if D == F0:
        return
    flo = np.float32(qlo)
    fhi = np.float32(qhi)
    for j in range(nsub):
        o = j * sub
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        idl = F1 / dl
        sxq = F0
        sqq = F0
        e2 = F0
        for i in range(sub):
            v = x[o + i]
            q = min(max(np.rint(v * idl), flo), fhi)
            L[o + i] = int(q) - qlo
            sxq += wt[o + i] * v * q
            sqq += wt[o + i] * q * q
            e = dl * q - v
            e2 += wt[o + i] * e * e
        if sqq == F0:
            continue
        s_opt = sxq / sqq / D
        cand = rint_clamp(s_opt, slo, shi)
        if cand == sc[j]:
            cand = sc[j] + (1 if s_opt > np.float32(sc[j]) else -1)
            if cand < slo or cand > shi:
                continue
        if cand == 0:
            continue
        dl = D * np.float32(cand)
        if _sym_sse(x, wt, o, sub, dl, qlo, qhi) < np.float64(e2):
            sc[j] = cand
            idl = F1 / dl
            for i in range(sub):
                L[o + i] = int(min(max(np.rint(x[o + i] * idl), flo), fhi)) - qlo
