// A CPU emulation of the CUDA features kernels.cu uses, so that the CPU tests can run the kernels'
// own source (tests/kernels_emulated.rs). Every CUDA thread of a block is a fiber (ucontext) on
// one OS thread; blocks run one after another. __syncthreads waits for every live thread of the
// block; a warp shuffle writes its value, waits for its warp's 32 lanes, reads, and waits again
// (the kernels shuffle only with whole warps converged). __shared__ variables are statics (shared
// by the block that runs), and bf16 is its bits with round-to-nearest-even conversion.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <stdint.h>
#include <ucontext.h>
#include <vector>

using std::max;
using std::min;

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define DYN_SHARED(name) float *name = emu_dyn_smem.data()

struct EmuFiber {
    ucontext_t ctx;
    int wait = 0;  // 0: runnable, 1: at a block barrier, 2: at a warp barrier
    unsigned gen = 0;
    bool done = false;
};
inline std::vector<float> emu_dyn_smem;
inline ucontext_t emu_main;
inline std::vector<EmuFiber> emu_fibers;
inline std::vector<char> emu_stacks;
inline std::function<void()> emu_kernel;
inline unsigned emu_cur, emu_alive, emu_block_gen, emu_block_arrived;
inline unsigned emu_warp_gen[32], emu_warp_arrived[32];
inline float emu_warp_buf[32][32];
constexpr size_t EMU_STACK = 64 * 1024;

inline void emu_yield() { swapcontext(&emu_fibers[emu_cur].ctx, &emu_main); }

inline void __syncthreads() {
    EmuFiber &f = emu_fibers[emu_cur];
    f.wait = 1;
    f.gen = emu_block_gen;
    if (++emu_block_arrived == emu_alive) {
        ++emu_block_gen;
        emu_block_arrived = 0;
    }
    emu_yield();
}

inline void emu_warp_wait() {
    const unsigned w = emu_cur >> 5, size = std::min(32u, unsigned(emu_fibers.size()) - 32 * w);
    EmuFiber &f = emu_fibers[emu_cur];
    f.wait = 2;
    f.gen = emu_warp_gen[w];
    if (++emu_warp_arrived[w] == size) {
        ++emu_warp_gen[w];
        emu_warp_arrived[w] = 0;
    }
    emu_yield();
}

inline float emu_exchange(float v, int src) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    emu_warp_buf[w][lane] = v;
    emu_warp_wait();
    const float r = emu_warp_buf[w][src & 31];
    emu_warp_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu_exchange(v, (threadIdx.x & 31) ^ mask); }
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, src); }

inline void emu_entry() {
    emu_kernel();
    emu_fibers[emu_cur].done = true;
    --emu_alive;
    if (emu_block_arrived > 0 && emu_block_arrived == emu_alive) {
        ++emu_block_gen;
        emu_block_arrived = 0;
    }
}

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return {uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
    u += 0x7fff + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}

// Runs `kernel` over the grid, block by block, with `smem_bytes` of dynamic shared memory.
template <class F>
void emu_launch(Dim3 grid, Dim3 block, size_t smem_bytes, F kernel) {
    const unsigned n = block.x;
    blockDim = block;
    gridDim = grid;
    // NaN, not zeros: a read of shared memory the kernel did not write shows in its output.
    emu_dyn_smem.assign(smem_bytes / 4, NAN);
    emu_kernel = kernel;
    emu_stacks.resize(size_t(n) * EMU_STACK);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                emu_fibers.assign(n, EmuFiber{});
                emu_alive = n;
                emu_block_gen = emu_block_arrived = 0;
                std::fill(std::begin(emu_warp_gen), std::end(emu_warp_gen), 0u);
                std::fill(std::begin(emu_warp_arrived), std::end(emu_warp_arrived), 0u);
                for (unsigned t = 0; t < n; ++t) {
                    EmuFiber &f = emu_fibers[t];
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = emu_stacks.data() + size_t(t) * EMU_STACK;
                    f.ctx.uc_stack.ss_size = EMU_STACK;
                    f.ctx.uc_link = &emu_main;
                    makecontext(&f.ctx, emu_entry, 0);
                }
                while (emu_alive > 0) {
                    bool progressed = false;
                    for (unsigned t = 0; t < n; ++t) {
                        EmuFiber &f = emu_fibers[t];
                        if (f.done || (f.wait == 1 && f.gen == emu_block_gen) || (f.wait == 2 && f.gen == emu_warp_gen[t >> 5])) continue;
                        f.wait = 0;
                        emu_cur = t;
                        threadIdx = {t, 0, 0};
                        swapcontext(&emu_main, &f.ctx);
                        progressed = true;
                    }
                    if (!progressed) {
                        fprintf(stderr, "emu: deadlock in block (%u, %u): threads wait at barriers that cannot complete\n", bx, by);
                        exit(3);
                    }
                }
            }
}
