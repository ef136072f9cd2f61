// collm's CUDA kernels: attention (forward and a recomputing backward, no [q, k] matrix in
// memory), RMSNorm, RoPE, token log-probabilities (log-softmax + gather) and AdamW.
//
// Built to PTX by crates/collm-model/build.rs (nvcc, --features cuda) and loaded by
// src/cuda/ops.rs. Every kernel reads f32 or bf16, computes in f32 and writes its input's dtype;
// the entry points carry the dtype in their name (_f32, _bf16). Each one is checked against the
// generic path (candle's ops) on a GPU by `collm bench gpu` (scripts/gpu-check.sh), and stays
// behind COLLM_CUDA_KERNELS until that check has passed. On the CPU, tests/kernels_emulated.rs
// runs this same source under a thread-per-CUDA-thread emulation (emu/emu.h) against collm's
// fused CPU ops.

#ifndef COLLM_EMU
#include <cuda_bf16.h>
#include <stdint.h>
// Dynamic shared memory (the emulation used by the CPU tests defines its own).
#define DYN_SHARED(name) extern __shared__ float name[]
#endif

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block; blockDim.x is a multiple of 32. `shm` holds 32 floats. Every thread
// gets the result.
__device__ float block_reduce(float v, float *shm, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // shm may still be read by a previous call
    if (lane == 0) shm[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? shm[lane] : (is_max ? -INFINITY : 0.f);
        x = is_max ? warp_max(x) : warp_sum(x);
        if (lane == 0) shm[0] = x;
    }
    __syncthreads();
    return shm[0];
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) · w, one block per row.

template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int d, float eps) {
    __shared__ float shm[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * d;
    T *yr = y + row * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(xr, j);
        ss += v * v;
    }
    ss = block_reduce(ss, shm, false);
    const float r = 1.f / sqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(yr, j, ld(xr, j) * r * ld(w, j));
}

// dx = r (g w − x c) with c = (Σ g w x) r² / d; r per row goes to rinv for the dw kernel.
template <typename T>
__device__ void rms_norm_bwd_dx(const T *x, const T *w, const T *g, T *dx, float *rinv, int d, float eps) {
    __shared__ float shm[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * d, *gr = g + row * d;
    T *dxr = dx + row * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float xv = ld(xr, j);
        ss += xv * xv;
        dot += ld(gr, j) * ld(w, j) * xv;
    }
    ss = block_reduce(ss, shm, false);
    dot = block_reduce(dot, shm, false);
    const float r = 1.f / sqrtf(ss / d + eps);
    const float c = dot * r * r / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(dxr, j, r * (ld(gr, j) * ld(w, j) - ld(xr, j) * c));
    if (threadIdx.x == 0) rinv[row] = r;
}

// Partial dw over a chunk of rows: part[chunk, j] = Σ_rows g x r. The chunks are summed after, in
// order, so the result does not depend on scheduling.
template <typename T>
__device__ void rms_norm_bwd_dw(const T *x, const T *g, const float *rinv, float *part, int rows, int d, int chunk_rows) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const int r0 = blockIdx.y * chunk_rows, r1 = min(rows, r0 + chunk_rows);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += ld(g, (size_t)r * d + j) * ld(x, (size_t)r * d + j) * rinv[r];
    part[(size_t)blockIdx.y * d + j] = acc;
}

// ---------------------------------------------------------------------------------------------
// RoPE ("rotate half"): x [tokens, heads, 2·half], cos/sin [tokens, half]; sign −1 inverts.

template <typename T>
__device__ void rope(const T *x, const float *cs, const float *sn, T *y, int tokens, int heads, int half, float sign) {
    const size_t n = (size_t)tokens * heads * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t i = idx % half, th = idx / half, tok = th / heads;
        const size_t base = th * 2 * half;
        const float a = ld(x, base + i), b = ld(x, base + i + half);
        const float c = cs[tok * half + i], s = sign * sn[tok * half + i];
        st(y, base + i, a * c - b * s);
        st(y, base + i + half, b * c + a * s);
    }
}

// ---------------------------------------------------------------------------------------------
// Token log-probabilities over f32 logits [n, vocab], one block per row.

extern "C" __global__ void token_logprobs_fwd_f32(const float *x, const uint32_t *targets, float *out, int vocab) {
    __shared__ float shm[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * vocab;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, xr[j]);
    mx = block_reduce(mx, shm, true);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - mx);
    s = block_reduce(s, shm, false);
    if (threadIdx.x == 0) out[row] = xr[targets[row]] - mx - logf(s);
}

// d logits = g (onehot(target) − softmax(x)).
extern "C" __global__ void token_logprobs_bwd_f32(const float *x, const uint32_t *targets, const float *g, float *dx, int vocab) {
    __shared__ float shm[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * vocab;
    float *dr = dx + row * vocab;
    const float gn = g[row];
    if (gn == 0.f) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = 0.f;
        return;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, xr[j]);
    mx = block_reduce(mx, shm, true);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - mx);
    s = block_reduce(s, shm, false);
    const float inv = 1.f / s;
    const uint32_t t = targets[row];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = -gn * expf(xr[j] - mx) * inv + (j == (int)t ? gn : 0.f);
}

// ---------------------------------------------------------------------------------------------
// AdamW, in place, in two kernels: the moments (m ← β m + (1 − β) g s, or with (g s)² for v),
// then the parameter p ← p · decay − lr · (m / bc1) / (√(v / bc2) + eps). All f32.

extern "C" __global__ void adamw_moment_f32(float *m, const float *g, size_t n, float beta, float gscale, int square) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * gscale;
        m[i] = beta * m[i] + (1.f - beta) * (square ? gi * gi : gi);
    }
}

extern "C" __global__ void adamw_param_f32(float *p, const float *m, const float *v, size_t n, float lr, float decay, float bc1,
                                           float bc2, float eps) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float mh = m[i] / bc1, vh = v[i] / bc2;
        p[i] = p[i] * decay - lr * mh / (sqrtf(vh) + eps);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: softmax(scale · q kᵀ + mask) v with q [pairs, rows, hd] (the n_rep query heads that
// share a key/value head stacked: rows = n_rep · q_len) and k, v [pairs, kl, hd]; pair = batch ·
// groups + group. The mask is causal over a cache of `past = kl − q_len` slots with padding:
// query position i may see key j when j ≤ past + i and (valid[batch, j] or j = past + i).
//
// One warp per query row (forward, dq) or key row (dk, dv); a block of W warps shares tiles of
// 32 keys (or queries) in shared memory, one per lane. Online softmax keeps nothing of size
// rows × kl: the backward recomputes probabilities from q, k and each row's log-sum-exp.
// hd is a multiple of 32 and at most 128 (ATTN_MAX_HD): each lane owns hd / 32 output columns.

#define ATTN_MAX_DD 4

__device__ __forceinline__ bool visible(const uint8_t *valid_b, int key, int last) {
    return key <= last && (valid_b[key] || key == last);
}

template <typename T>
__device__ void attn_fwd(const T *q, const T *k, const T *v, const uint8_t *valid, T *out, int groups, int rows, int q_len, int kl,
                         int hd, float scale) {
    DYN_SHARED(sm);
    const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = hd >> 5;
    float *Ks = sm;                  // [32, hd + 1]
    float *Vs = Ks + 32 * (hd + 1);  // [32, hd]
    float *Qs = Vs + 32 * hd;        // [W, hd], pre-scaled
    const int pair = blockIdx.y, b = pair / groups, past = kl - q_len;
    const int row0 = blockIdx.x * W, row = row0 + warp;
    const bool active = row < rows;
    const int last = past + (active ? row % q_len : 0);
    int kmax = 0;
    for (int w = 0; w < W; ++w)
        if (row0 + w < rows) kmax = max(kmax, past + (row0 + w) % q_len + 1);
    const T *qp = q + ((size_t)pair * rows + row) * hd;
    for (int d = lane; d < hd; d += 32) Qs[warp * hd + d] = active ? ld(qp, d) * scale : 0.f;
    const T *kp = k + (size_t)pair * kl * hd, *vp = v + (size_t)pair * kl * hd;
    const uint8_t *vb = valid + (size_t)b * kl;
    float m = -INFINITY, l = 0.f, acc[ATTN_MAX_DD] = {0.f, 0.f, 0.f, 0.f};
    for (int t0 = 0; t0 < kmax; t0 += 32) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < 32 * hd; idx += blockDim.x) {
            const int j = idx / hd, d = idx % hd, key = t0 + j;
            Ks[j * (hd + 1) + d] = key < kl ? ld(kp, (size_t)key * hd + d) : 0.f;
            Vs[j * hd + d] = key < kl ? ld(vp, (size_t)key * hd + d) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        const int key = t0 + lane;
        float s = -INFINITY;
        if (key < kl && visible(vb, key, last)) {
            float dot = 0.f;
            for (int d = 0; d < hd; ++d) dot += Qs[warp * hd + d] * Ks[lane * (hd + 1) + d];
            s = dot;
        }
        const float mnew = fmaxf(m, warp_max(s));
        if (mnew == -INFINITY) continue;  // nothing visible yet (the same in the whole warp)
        const float p = s == -INFINITY ? 0.f : expf(s - mnew);
        const float corr = m == -INFINITY ? 0.f : expf(m - mnew);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int dd = 0; dd < ATTN_MAX_DD; ++dd) acc[dd] *= corr;
        for (int jj = 0; jj < 32; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
                if (dd < nd) acc[dd] += pj * Vs[jj * hd + lane + 32 * dd];
        }
        m = mnew;
    }
    if (active) {
        T *op = out + ((size_t)pair * rows + row) * hd;
        const float inv = 1.f / l;
#pragma unroll
        for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
            if (dd < nd) st(op, lane + 32 * dd, acc[dd] * inv);
    }
}

// Per query row: its log-sum-exp (of the scaled, masked scores) and D = Σ dO ⊙ O.
template <typename T>
__device__ void attn_bwd_prep(const T *q, const T *k, const T *o, const T *go, const uint8_t *valid, float *lse, float *dsum,
                              int groups, int rows, int q_len, int kl, int hd, float scale) {
    DYN_SHARED(sm);
    const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Ks = sm;                  // [32, hd + 1]
    float *Qs = Ks + 32 * (hd + 1);  // [W, hd]
    const int pair = blockIdx.y, b = pair / groups, past = kl - q_len;
    const int row0 = blockIdx.x * W, row = row0 + warp;
    const bool active = row < rows;
    const int last = past + (active ? row % q_len : 0);
    int kmax = 0;
    for (int w = 0; w < W; ++w)
        if (row0 + w < rows) kmax = max(kmax, past + (row0 + w) % q_len + 1);
    const size_t ro = ((size_t)pair * rows + row) * hd;
    float dd_acc = 0.f;
    for (int d = lane; d < hd; d += 32) {
        Qs[warp * hd + d] = active ? ld(q, ro + d) * scale : 0.f;
        if (active) dd_acc += ld(go, ro + d) * ld(o, ro + d);
    }
    const T *kp = k + (size_t)pair * kl * hd;
    const uint8_t *vb = valid + (size_t)b * kl;
    float m = -INFINITY, l = 0.f;
    for (int t0 = 0; t0 < kmax; t0 += 32) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < 32 * hd; idx += blockDim.x) {
            const int j = idx / hd, d = idx % hd, key = t0 + j;
            Ks[j * (hd + 1) + d] = key < kl ? ld(kp, (size_t)key * hd + d) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        const int key = t0 + lane;
        float s = -INFINITY;
        if (key < kl && visible(vb, key, last)) {
            float dot = 0.f;
            for (int d = 0; d < hd; ++d) dot += Qs[warp * hd + d] * Ks[lane * (hd + 1) + d];
            s = dot;
        }
        const float mnew = fmaxf(m, warp_max(s));
        if (mnew == -INFINITY) continue;
        const float p = s == -INFINITY ? 0.f : expf(s - mnew);
        l = l * (m == -INFINITY ? 0.f : expf(m - mnew)) + warp_sum(p);
        m = mnew;
    }
    dd_acc = warp_sum(dd_acc);
    if (active && lane == 0) {
        lse[(size_t)pair * rows + row] = m + logf(l);
        dsum[(size_t)pair * rows + row] = dd_acc;
    }
}

// dQ_i = scale · Σ_j P_ij (dP_ij − D_i) K_j with dP_ij = dO_i · V_j; one warp per query row.
template <typename T>
__device__ void attn_bwd_dq(const T *q, const T *k, const T *v, const T *go, const uint8_t *valid, const float *lse, const float *dsum,
                            T *dq, int groups, int rows, int q_len, int kl, int hd, float scale) {
    DYN_SHARED(sm);
    const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = hd >> 5;
    float *Ks = sm;                    // [32, hd + 1]
    float *Vs = Ks + 32 * (hd + 1);    // [32, hd + 1]
    float *Qs = Vs + 32 * (hd + 1);    // [W, hd], pre-scaled
    float *Gs = Qs + W * hd;           // [W, hd]
    const int pair = blockIdx.y, b = pair / groups, past = kl - q_len;
    const int row0 = blockIdx.x * W, row = row0 + warp;
    const bool active = row < rows;
    const int last = past + (active ? row % q_len : 0);
    int kmax = 0;
    for (int w = 0; w < W; ++w)
        if (row0 + w < rows) kmax = max(kmax, past + (row0 + w) % q_len + 1);
    const size_t ri = (size_t)pair * rows + row, ro = ri * hd;
    for (int d = lane; d < hd; d += 32) {
        Qs[warp * hd + d] = active ? ld(q, ro + d) * scale : 0.f;
        Gs[warp * hd + d] = active ? ld(go, ro + d) : 0.f;
    }
    const float lse_i = active ? lse[ri] : 0.f, d_i = active ? dsum[ri] : 0.f;
    const T *kp = k + (size_t)pair * kl * hd, *vp = v + (size_t)pair * kl * hd;
    const uint8_t *vb = valid + (size_t)b * kl;
    float acc[ATTN_MAX_DD] = {0.f, 0.f, 0.f, 0.f};
    for (int t0 = 0; t0 < kmax; t0 += 32) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < 32 * hd; idx += blockDim.x) {
            const int j = idx / hd, d = idx % hd, key = t0 + j;
            Ks[j * (hd + 1) + d] = key < kl ? ld(kp, (size_t)key * hd + d) : 0.f;
            Vs[j * (hd + 1) + d] = key < kl ? ld(vp, (size_t)key * hd + d) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        const int key = t0 + lane;
        float ds = 0.f;
        if (key < kl && visible(vb, key, last)) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; ++d) {
                s += Qs[warp * hd + d] * Ks[lane * (hd + 1) + d];
                dp += Gs[warp * hd + d] * Vs[lane * (hd + 1) + d];
            }
            ds = expf(s - lse_i) * (dp - d_i);
        }
        for (int jj = 0; jj < 32; ++jj) {
            const float dj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
                if (dd < nd) acc[dd] += dj * Ks[jj * (hd + 1) + lane + 32 * dd];
        }
    }
    if (active) {
#pragma unroll
        for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
            if (dd < nd) st(dq, ro + lane + 32 * dd, acc[dd] * scale);
    }
}

// dV_j = Σ_i P_ij dO_i and dK_j = scale · Σ_i P_ij (dP_ij − D_i) Q_i over every query row of the
// key's group (all n_rep heads) that sees it; one warp per key row, tiles of 32 query positions.
template <typename T>
__device__ void attn_bwd_dkv(const T *q, const T *k, const T *v, const T *go, const uint8_t *valid, const float *lse, const float *dsum,
                             T *dk, T *dv, int groups, int rows, int q_len, int kl, int hd, float scale) {
    DYN_SHARED(sm);
    const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = hd >> 5;
    float *Qs = sm;                    // [32, hd + 1]
    float *Gs = Qs + 32 * (hd + 1);    // [32, hd + 1]
    float *Kw = Gs + 32 * (hd + 1);    // [W, hd]
    float *Vw = Kw + W * hd;           // [W, hd]
    float *Ls = Vw + W * hd;           // [32]
    float *Ds = Ls + 32;               // [32]
    const int pair = blockIdx.y, b = pair / groups, past = kl - q_len, n_rep = rows / q_len;
    const int key0 = blockIdx.x * W, key = key0 + warp;
    const bool active = key < kl;
    const size_t ko = ((size_t)pair * kl + key) * hd;
    for (int d = lane; d < hd; d += 32) {
        Kw[warp * hd + d] = active ? ld(k, ko + d) : 0.f;
        Vw[warp * hd + d] = active ? ld(v, ko + d) : 0.f;
    }
    const uint8_t *vb = valid + (size_t)b * kl;
    const bool key_valid = active && vb[key];
    // The first query position that may see any key of this block.
    const int q_first = max(0, key0 - past);
    float ak[ATTN_MAX_DD] = {0.f, 0.f, 0.f, 0.f}, av[ATTN_MAX_DD] = {0.f, 0.f, 0.f, 0.f};
    for (int h = 0; h < n_rep; ++h) {
        for (int p0 = q_first; p0 < q_len; p0 += 32) {
            __syncthreads();
            const size_t rbase = (size_t)pair * rows + (size_t)h * q_len;
            for (int idx = threadIdx.x; idx < 32 * hd; idx += blockDim.x) {
                const int i = idx / hd, d = idx % hd, qp = p0 + i;
                const bool in = qp < q_len;
                Qs[i * (hd + 1) + d] = in ? ld(q, (rbase + qp) * hd + d) : 0.f;
                Gs[i * (hd + 1) + d] = in ? ld(go, (rbase + qp) * hd + d) : 0.f;
            }
            if (threadIdx.x < 32) {
                const int qp = p0 + threadIdx.x;
                Ls[threadIdx.x] = qp < q_len ? lse[rbase + qp] : 0.f;
                Ds[threadIdx.x] = qp < q_len ? dsum[rbase + qp] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            const int qp = p0 + lane, last = past + qp;
            float p = 0.f, ds = 0.f;
            if (qp < q_len && key <= last && (key_valid || key == last)) {
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < hd; ++d) {
                    s += Qs[lane * (hd + 1) + d] * Kw[warp * hd + d];
                    dp += Gs[lane * (hd + 1) + d] * Vw[warp * hd + d];
                }
                p = expf(s * scale - Ls[lane]);
                ds = p * (dp - Ds[lane]);
            }
            for (int ii = 0; ii < 32; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii), di = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
                    if (dd < nd) {
                        av[dd] += pi * Gs[ii * (hd + 1) + lane + 32 * dd];
                        ak[dd] += di * Qs[ii * (hd + 1) + lane + 32 * dd];
                    }
            }
        }
    }
    if (active) {
#pragma unroll
        for (int dd = 0; dd < ATTN_MAX_DD; ++dd)
            if (dd < nd) {
                st(dk, ko + lane + 32 * dd, ak[dd] * scale);
                st(dv, ko + lane + 32 * dd, av[dd]);
            }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per dtype.

#define ENTRY(T, SFX)                                                                                                              \
    extern "C" __global__ void rms_norm_fwd_##SFX(const T *x, const T *w, T *y, int d, float eps) { rms_norm_fwd(x, w, y, d, eps); } \
    extern "C" __global__ void rms_norm_bwd_dx_##SFX(const T *x, const T *w, const T *g, T *dx, float *rinv, int d, float eps) {     \
        rms_norm_bwd_dx(x, w, g, dx, rinv, d, eps);                                                                                \
    }                                                                                                                              \
    extern "C" __global__ void rms_norm_bwd_dw_##SFX(const T *x, const T *g, const float *rinv, float *part, int rows, int d,       \
                                                     int chunk_rows) {                                                             \
        rms_norm_bwd_dw(x, g, rinv, part, rows, d, chunk_rows);                                                                    \
    }                                                                                                                              \
    extern "C" __global__ void rope_##SFX(const T *x, const float *cs, const float *sn, T *y, int tokens, int heads, int half,     \
                                          float sign) {                                                                            \
        rope(x, cs, sn, y, tokens, heads, half, sign);                                                                             \
    }                                                                                                                              \
    extern "C" __global__ void attn_fwd_##SFX(const T *q, const T *k, const T *v, const uint8_t *valid, T *out, int groups,       \
                                              int rows, int q_len, int kl, int hd, float scale) {                                  \
        attn_fwd(q, k, v, valid, out, groups, rows, q_len, kl, hd, scale);                                                         \
    }                                                                                                                              \
    extern "C" __global__ void attn_bwd_prep_##SFX(const T *q, const T *k, const T *o, const T *go, const uint8_t *valid,         \
                                                   float *lse, float *dsum, int groups, int rows, int q_len, int kl, int hd,       \
                                                   float scale) {                                                                  \
        attn_bwd_prep(q, k, o, go, valid, lse, dsum, groups, rows, q_len, kl, hd, scale);                                          \
    }                                                                                                                              \
    extern "C" __global__ void attn_bwd_dq_##SFX(const T *q, const T *k, const T *v, const T *go, const uint8_t *valid,           \
                                                 const float *lse, const float *dsum, T *dq, int groups, int rows, int q_len,      \
                                                 int kl, int hd, float scale) {                                                    \
        attn_bwd_dq(q, k, v, go, valid, lse, dsum, dq, groups, rows, q_len, kl, hd, scale);                                        \
    }                                                                                                                              \
    extern "C" __global__ void attn_bwd_dkv_##SFX(const T *q, const T *k, const T *v, const T *go, const uint8_t *valid,          \
                                                  const float *lse, const float *dsum, T *dk, T *dv, int groups, int rows,         \
                                                  int q_len, int kl, int hd, float scale) {                                        \
        attn_bwd_dkv(q, k, v, go, valid, lse, dsum, dk, dv, groups, rows, q_len, kl, hd, scale);                                   \
    }

ENTRY(float, f32)
ENTRY(__nv_bfloat16, bf16)
