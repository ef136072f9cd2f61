// Runs kernels.cu's kernels under emu.h for tests/kernels_emulated.rs, with the launch
// configurations of src/cuda/ops.rs (256 threads per row block, 8 warps per attention block, the
// same dynamic shared memory). Inputs and outputs are raw little-endian files in a directory:
//   driver DIR rms DTYPE ROWS D EPS          x w g        -> y dx dw
//   driver DIR rope DTYPE TOKENS HEADS HALF  x cos sin g  -> y dx
//   driver DIR lp N VOCAB                    x t(u32) g   -> y dx
//   driver DIR attn DTYPE B GROUPS ROWS Q_LEN KL HD SCALE   q k v valid(u8) go -> o dq dk dv
//   driver DIR adamw N LR DECAY B1 B2 EPS BC1 BC2 GSCALE    p g m v -> p m v
// DTYPE is f32 or bf16 (tensors are f32 in the files; bf16 runs round them on the way in).
#define COLLM_EMU 1
#include "emu.h"
#include "../kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <string>

static std::string dir;

template <class T>
static std::vector<T> rd(const char *name, size_t n) {
    std::vector<T> v(n);
    FILE *f = fopen((dir + "/" + name).c_str(), "rb");
    if (!f || fread(v.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "driver: cannot read %zu values from %s\n", n, name);
        exit(2);
    }
    fclose(f);
    return v;
}

static void wr(const char *name, const std::vector<float> &v) {
    FILE *f = fopen((dir + "/" + name).c_str(), "wb");
    fwrite(v.data(), 4, v.size(), f);
    fclose(f);
}

static std::vector<__nv_bfloat16> to_bf(const std::vector<float> &v) {
    std::vector<__nv_bfloat16> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16(v[i]);
    return o;
}
static std::vector<float> from(const std::vector<float> &v) { return v; }
static std::vector<float> from(const std::vector<__nv_bfloat16> &v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __bfloat162float(v[i]);
    return o;
}
template <class T> static std::vector<T> cast(const std::vector<float> &v);
template <> std::vector<float> cast<float>(const std::vector<float> &v) { return v; }
template <> std::vector<__nv_bfloat16> cast<__nv_bfloat16>(const std::vector<float> &v) { return to_bf(v); }

static const unsigned BLOCK = 256, WARPS = 8;

static Dim3 flat(size_t n) {
    size_t b = (n + BLOCK - 1) / BLOCK;
    b = std::max<size_t>(1, std::min<size_t>(b, 1 << 16));
    return {unsigned(b), 1, 1};
}

template <class T>
static void rms(char **a, void (*fwd)(const T *, const T *, T *, int, float),
                void (*bdx)(const T *, const T *, const T *, T *, float *, int, float),
                void (*bdw)(const T *, const T *, const float *, float *, int, int, int)) {
    int rows = atoi(a[0]), d = atoi(a[1]);
    float eps = atof(a[2]);
    auto x = cast<T>(rd<float>("x", size_t(rows) * d)), w = cast<T>(rd<float>("w", d)), g = cast<T>(rd<float>("g", size_t(rows) * d));
    std::vector<T> y(x.size()), dx(x.size());
    std::vector<float> rinv(rows);
    emu_launch({unsigned(rows), 1, 1}, {BLOCK, 1, 1}, 0, [&] { fwd(x.data(), w.data(), y.data(), d, eps); });
    emu_launch({unsigned(rows), 1, 1}, {BLOCK, 1, 1}, 0, [&] { bdx(x.data(), w.data(), g.data(), dx.data(), rinv.data(), d, eps); });
    const int chunk = std::max(64, (rows + 65534) / 65535), chunks = (rows + chunk - 1) / chunk;
    std::vector<float> part(size_t(chunks) * d), dw(d, 0.f);
    emu_launch({unsigned((d + BLOCK - 1) / BLOCK), unsigned(chunks), 1}, {BLOCK, 1, 1}, 0,
               [&] { bdw(x.data(), g.data(), rinv.data(), part.data(), rows, d, chunk); });
    for (int c = 0; c < chunks; ++c)
        for (int j = 0; j < d; ++j) dw[j] += part[size_t(c) * d + j];
    wr("y", from(y));
    wr("dx", from(dx));
    wr("dw", dw);
}

template <class T>
static void rope_run(char **a, void (*k)(const T *, const float *, const float *, T *, int, int, int, float)) {
    int tokens = atoi(a[0]), heads = atoi(a[1]), half = atoi(a[2]);
    size_t n = size_t(tokens) * heads * 2 * half;
    auto x = cast<T>(rd<float>("x", n)), g = cast<T>(rd<float>("g", n));
    auto cs = rd<float>("cos", size_t(tokens) * half), sn = rd<float>("sin", size_t(tokens) * half);
    std::vector<T> y(n), dx(n);
    emu_launch(flat(n / 2), {BLOCK, 1, 1}, 0, [&] { k(x.data(), cs.data(), sn.data(), y.data(), tokens, heads, half, 1.f); });
    emu_launch(flat(n / 2), {BLOCK, 1, 1}, 0, [&] { k(g.data(), cs.data(), sn.data(), dx.data(), tokens, heads, half, -1.f); });
    wr("y", from(y));
    wr("dx", from(dx));
}

template <class T, class F, class P, class Q, class K>
static void attn_run(char **a, F fwd, P prep, Q bdq, K bdkv) {
    int b = atoi(a[0]), groups = atoi(a[1]), rows = atoi(a[2]), q_len = atoi(a[3]), kl = atoi(a[4]), hd = atoi(a[5]);
    float scale = atof(a[6]);
    size_t pairs = size_t(b) * groups, nq = pairs * rows * hd, nk = pairs * kl * hd;
    auto q = cast<T>(rd<float>("q", nq)), k = cast<T>(rd<float>("k", nk)), v = cast<T>(rd<float>("v", nk));
    auto go = cast<T>(rd<float>("go", nq));
    auto valid = rd<uint8_t>("valid", size_t(b) * kl);
    std::vector<T> o(nq), dq(nq), dk(nk), dv(nk);
    std::vector<float> lse(pairs * rows), dsum(pairs * rows);
    const unsigned rb = (rows + WARPS - 1) / WARPS, kb = (kl + WARPS - 1) / WARPS, NP = unsigned(pairs);
    const Dim3 blk{32 * WARPS, 1, 1};
    emu_launch({rb, NP, 1}, blk, 4 * (32 * (hd + 1) + 32 * hd + WARPS * hd),
               [&] { fwd(q.data(), k.data(), v.data(), valid.data(), o.data(), groups, rows, q_len, kl, hd, scale); });
    emu_launch({rb, NP, 1}, blk, 4 * (32 * (hd + 1) + WARPS * hd), [&] {
        prep(q.data(), k.data(), o.data(), go.data(), valid.data(), lse.data(), dsum.data(), groups, rows, q_len, kl, hd, scale);
    });
    emu_launch({rb, NP, 1}, blk, 4 * (64 * (hd + 1) + 2 * WARPS * hd), [&] {
        bdq(q.data(), k.data(), v.data(), go.data(), valid.data(), lse.data(), dsum.data(), dq.data(), groups, rows, q_len, kl, hd, scale);
    });
    emu_launch({kb, NP, 1}, blk, 4 * (64 * (hd + 1) + 2 * WARPS * hd + 64), [&] {
        bdkv(q.data(), k.data(), v.data(), go.data(), valid.data(), lse.data(), dsum.data(), dk.data(), dv.data(), groups, rows, q_len,
             kl, hd, scale);
    });
    wr("o", from(o));
    wr("dq", from(dq));
    wr("dk", from(dk));
    wr("dv", from(dv));
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: driver DIR OP ...\n");
        return 2;
    }
    dir = argv[1];
    std::string op = argv[2];
    char **a = argv + 3;
    if (op == "rms") {
        if (std::string(a[0]) == "bf16") rms<__nv_bfloat16>(a + 1, rms_norm_fwd_bf16, rms_norm_bwd_dx_bf16, rms_norm_bwd_dw_bf16);
        else rms<float>(a + 1, rms_norm_fwd_f32, rms_norm_bwd_dx_f32, rms_norm_bwd_dw_f32);
    } else if (op == "rope") {
        if (std::string(a[0]) == "bf16") rope_run<__nv_bfloat16>(a + 1, rope_bf16);
        else rope_run<float>(a + 1, rope_f32);
    } else if (op == "lp") {
        int n = atoi(a[0]), vocab = atoi(a[1]);
        auto x = rd<float>("x", size_t(n) * vocab);
        auto t = rd<uint32_t>("t", n);
        auto g = rd<float>("g", n);
        std::vector<float> y(n), dx(x.size());
        emu_launch({unsigned(n), 1, 1}, {BLOCK, 1, 1}, 0, [&] { token_logprobs_fwd_f32(x.data(), t.data(), y.data(), vocab); });
        emu_launch({unsigned(n), 1, 1}, {BLOCK, 1, 1}, 0, [&] { token_logprobs_bwd_f32(x.data(), t.data(), g.data(), dx.data(), vocab); });
        wr("y", y);
        wr("dx", dx);
    } else if (op == "attn") {
        if (std::string(a[0]) == "bf16")
            attn_run<__nv_bfloat16>(a + 1, attn_fwd_bf16, attn_bwd_prep_bf16, attn_bwd_dq_bf16, attn_bwd_dkv_bf16);
        else attn_run<float>(a + 1, attn_fwd_f32, attn_bwd_prep_f32, attn_bwd_dq_f32, attn_bwd_dkv_f32);
    } else if (op == "adamw") {
        size_t n = strtoull(a[0], nullptr, 10);
        float lr = atof(a[1]), decay = atof(a[2]), b1 = atof(a[3]), b2 = atof(a[4]), eps = atof(a[5]), bc1 = atof(a[6]), bc2 = atof(a[7]),
              gs = atof(a[8]);
        auto p = rd<float>("p", n), g = rd<float>("g", n), m = rd<float>("m", n), v = rd<float>("v", n);
        emu_launch(flat(n), {BLOCK, 1, 1}, 0, [&] { adamw_moment_f32(m.data(), g.data(), n, b1, gs, 0); });
        emu_launch(flat(n), {BLOCK, 1, 1}, 0, [&] { adamw_moment_f32(v.data(), g.data(), n, b2, gs, 1); });
        emu_launch(flat(n), {BLOCK, 1, 1}, 0, [&] { adamw_param_f32(p.data(), m.data(), v.data(), n, lr, decay, bc1, bc2, eps); });
        wr("p", p);
        wr("m", m);
        wr("v", v);
    } else {
        fprintf(stderr, "driver: unknown op %s\n", op.c_str());
        return 2;
    }
    return 0;
}
