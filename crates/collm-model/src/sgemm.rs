//! f32 matrix multiply for the CPU kernels: C = α·A·B (+ C) on strided row-major views.
//!
//! On a CPU with full-width AVX-512 this is collm's own packed GEMM (below); elsewhere it is the
//! `gemm` crate, whose AVX-512 kernels build only on nightly Rust, so on stable it runs AVX2 code
//! even where the CPU has twice the vector width (see [`best_kernel`] for the choice). The kernel follows the usual layering of a packed
//! GEMM: the K dimension in blocks of [`KC`], B packed into panels of [`NR`] columns and A into
//! panels of [`MR`] rows (zero-padded, transposes and strides absorbed by the packing), and a
//! register-blocked MR×NR micro-kernel that keeps its whole C tile in registers across the
//! block. Each rayon thread takes one slab of C and packs its own operands; the packing buffers
//! live per thread and are reused from call to call.

use std::cell::RefCell;

/// A strided operand: element (r, c) is at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// Which implementation [`gemm`] runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    /// collm's AVX-512 packed GEMM.
    Avx512,
    /// The `gemm` crate (AVX2/FMA or scalar, detected by it at run time).
    GemmCrate,
    /// AMX tiles in bf16 with f32 sums ([`crate::amx`]): each operand rounded to bf16, a lower
    /// precision than f32 (as a GPU's bf16 matmuls), so never chosen unless asked for
    /// (`COLLM_GEMM=amx`); on a CPU without AMX the f32 kernel runs.
    AmxBf16,
}

/// The kernel this CPU gets: collm's AVX-512 kernel where the CPU has `avx512f` and executes
/// 512-bit FMAs at full width, else the `gemm` crate. AMD's Zen 4 (family 19h) splits each 512-bit
/// FMA into two 256-bit halves, so AVX-512 has no more FLOPs per cycle there than AVX2; measured
/// on a 2-core EPYC of that family (`collm bench peak`, 2026-12-06) the gemm crate's AVX2 kernels
/// ran SmolLM2's projection shapes at about 213 GFLOPS against about 198 for this one, so such a
/// CPU keeps the gemm crate. `COLLM_GEMM=gemm` or `COLLM_GEMM=avx512` overrides the choice;
/// `COLLM_GEMM=amx` runs every product on AMX tiles in bf16 ([`Kernel::AmxBf16`]).
pub fn best_kernel() -> Kernel {
    use std::sync::OnceLock;
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        let f32_kernel = if has_avx512() && !half_width_avx512() { Kernel::Avx512 } else { Kernel::GemmCrate };
        match std::env::var("COLLM_GEMM").ok().as_deref() {
            Some("gemm") => Kernel::GemmCrate,
            Some("avx512") if has_avx512() => Kernel::Avx512,
            Some("amx") if crate::amx::available() => Kernel::AmxBf16,
            Some("amx") => {
                eprintln!("COLLM_GEMM=amx: this CPU or OS has no AMX bf16 tiles, so the products stay in f32 ({f32_kernel:?})");
                f32_kernel
            }
            _ => f32_kernel,
        }
    })
}

/// Whether this CPU has AVX-512F.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs 512-bit FMAs as two 256-bit halves: AMD family 19h (Zen 4).
pub fn half_width_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let (vendor, sig) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1).eax);
        let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
        let family = ((sig >> 8) & 0xf) + if (sig >> 8) & 0xf == 0xf { (sig >> 20) & 0xff } else { 0 };
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// C[m, n] = α·A[m, k]·B[k, n] (+ C when `accumulate`), C row-major with row stride `c_rs`;
/// `parallel` spreads the work over the rayon threads. Without `accumulate` C is only written,
/// never read, so it may start uninitialised.
///
/// # Safety
/// Every element of A, B and C that the views and sizes name must be valid (C for writing).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(m: usize, n: usize, k: usize, c: *mut f32, c_rs: usize, accumulate: bool, a: View, b: View, alpha: f32, parallel: bool) {
    gemm_with(best_kernel(), m, n, k, c, c_rs, accumulate, a, b, alpha, parallel)
}

/// [`gemm`] through the kernel named (tests and benchmarks compare them); [`Kernel::Avx512`] on
/// a CPU without AVX-512 falls back to the `gemm` crate.
///
/// # Safety
/// As for [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_with(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * c_rs), 0, n);
            }
        }
        return;
    }
    if kernel == Kernel::AmxBf16 && crate::amx::gemm_bf16(m, n, k, c, c_rs, accumulate, a, b, alpha, parallel) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx512 | Kernel::AmxBf16) && has_avx512() {
        return avx512::gemm(m, n, k, c, c_rs, accumulate, a, b, alpha, parallel);
    }
    let threads = rayon::current_num_threads();
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0f32,
        alpha,
        false,
        false,
        false,
        if parallel && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
    );
}

/// How the operands of a product lie in memory (row-major): the three GEMMs of a linear layer
/// y = x Wᵀ, forward and backward.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Operands {
    /// C[m, n] = A[m, k] · B[n, k]ᵀ: the forward, x · Wᵀ.
    Nt,
    /// C[m, n] = A[m, k] · B[k, n]: the input's gradient, dy · W.
    Nn,
    /// C[m, n] = A[k, m]ᵀ · B[k, n]: the weight's gradient, dyᵀ · x.
    Tn,
}

/// C[m, n] = A[m, k] · B[n, k]^T on row-major slices through the kernel named (benchmarks
/// compare the kernels with it).
pub fn matmul_nt_with(kernel: Kernel, a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    matmul_with(kernel, Operands::Nt, a, m, k, b, n)
}

/// The product C[m, n] of A and B laid out as `ops` says, through the kernel named.
pub fn matmul_with(kernel: Kernel, ops: Operands, a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    assert!(a.len() == m * k && b.len() == n * k, "matmul_with: shapes do not match the data ({m}x{k} · {k}x{n}, {ops:?})");
    let (av, bv) = match ops {
        Operands::Nt => (View { ptr: a.as_ptr(), rs: k, cs: 1 }, View { ptr: b.as_ptr(), rs: 1, cs: k }),
        Operands::Nn => (View { ptr: a.as_ptr(), rs: k, cs: 1 }, View { ptr: b.as_ptr(), rs: n, cs: 1 }),
        Operands::Tn => (View { ptr: a.as_ptr(), rs: 1, cs: m }, View { ptr: b.as_ptr(), rs: n, cs: 1 }),
    };
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the assert keeps every read inside A and B (each layout's views name m·k and k·n
    // elements); every element of C is written before set_len exposes it.
    unsafe {
        gemm_with(kernel, m, n, k, c.as_mut_ptr(), n, false, av, bv, 1.0, true);
        c.set_len(m * n);
    }
    c
}

/// Rows of A per micro-kernel call (and per packed A panel).
pub const MR: usize = 14;
/// Columns of B per micro-kernel call: two 16-lane vectors.
pub const NR: usize = 32;
/// Depth of one block of K: an A panel (14×256) and a B panel (256×32) fit in L1 together.
const KC: usize = 256;
/// Columns of B packed at a time (256×1024 floats, 1 MiB: L2).
const NC: usize = 1024;
/// Rows of A packed at a time (224×256 floats, 224 KiB: L2).
const MC: usize = MR * 16;
/// Up to this many floats (8 MiB) an A that spans several column blocks is packed once.
const WHOLE_A: usize = 1 << 21;

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Shares a raw pointer with rayon's workers (each writes a disjoint part).
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Runs `serial(rows, cols, c, a, b)` on each of `threads` disjoint slabs of C [m, n] at once,
/// with the views moved to the slab: one fork-join per call. The slabs cut across the longer
/// side of C (columns in multiples of `col_block`, rows in multiples of `row_block`), so the
/// operand every thread packs again is the smaller one.
///
/// # Safety
/// As for [`gemm`]; `serial` must touch only the slab of C it is given.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn over_slabs(
    m: usize,
    n: usize,
    c: *mut f32,
    c_rs: usize,
    a: View,
    b: View,
    threads: usize,
    (row_block, col_block): (usize, usize),
    serial: impl Fn(usize, usize, *mut f32, View, View) + Sync,
) {
    let (c, a, b) = (Shared(c), Shared(a), Shared(b));
    let slab = |t: usize| {
        let (c, a, b) = (c, a, b);
        if n >= m {
            let w = n.div_ceil(threads).next_multiple_of(col_block);
            let j0 = (t * w).min(n);
            let cols = w.min(n - j0);
            if cols > 0 {
                serial(m, cols, c.0.add(j0), a.0, View { ptr: b.0.ptr.add(j0 * b.0.cs), ..b.0 });
            }
        } else {
            let h = m.div_ceil(threads).next_multiple_of(row_block);
            let i0 = (t * h).min(m);
            let rows = h.min(m - i0);
            if rows > 0 {
                serial(rows, n, c.0.add(i0 * c_rs), View { ptr: a.0.ptr.add(i0 * a.0.rs), ..a.0 }, b.0);
            }
        }
    };
    use rayon::prelude::*;
    (0..threads).into_par_iter().for_each(slab);
}

/// Packs rows `r0..r0+rows` × columns `c0..c0+cols` of a view into panels of `w` along the
/// panel dimension. `by_rows`: panels of w rows (A), each stored column by column (w values per
/// column); otherwise panels of w columns (B), each stored row by row (w values per row). The
/// last panel is zero-padded.
#[allow(clippy::too_many_arguments)]
unsafe fn pack(dst: &mut [f32], v: View, r0: usize, rows: usize, c0: usize, cols: usize, w: usize, by_rows: bool) {
    // (panel extent, depth) with element (p, d) of the panel dimension p and depth d.
    let (extent, depth) = if by_rows { (rows, cols) } else { (cols, rows) };
    let (ps, ds) = if by_rows { (v.rs, v.cs) } else { (v.cs, v.rs) };
    let base = Shared(v.ptr.add(r0 * v.rs + c0 * v.cs));
    let panel = move |idx: usize, out: &mut [f32]| {
        let base = base;
        let p0 = idx * w;
        let live = w.min(extent - p0);
        for d in 0..depth {
            let o = &mut out[d * w..(d + 1) * w];
            let src = base.0.add(p0 * ps + d * ds);
            if ps == 1 {
                std::ptr::copy_nonoverlapping(src, o.as_mut_ptr(), live);
            } else {
                for (p, x) in o[..live].iter_mut().enumerate() {
                    *x = *src.add(p * ps);
                }
            }
            o[live..].fill(0.0);
        }
    };
    let panels = extent.div_ceil(w);
    for (i, out) in dst[..panels * w * depth].chunks_mut(w * depth).enumerate() {
        panel(i, out);
    }
}

/// The 16×16 transpose of 32-bit lanes in registers (the packing's), for the AMX packing too.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::transpose16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
        a: View,
        b: View,
        alpha: f32,
        parallel: bool,
    ) {
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        // Small products are not worth waking the other threads for.
        let threads = if (m as f64) * (n as f64) * (k as f64) < 4e6 { 1 } else { threads };
        if threads <= 1 {
            return serial(m, n, k, c, c_rs, accumulate, a, b, alpha);
        }
        // Each thread runs the whole blocked product on its slab of C with its own packing.
        over_slabs(m, n, c, c_rs, a, b, threads, (MR, NR), |rows, cols, c, a, b| serial(rows, cols, k, c, c_rs, accumulate, a, b, alpha));
    }

    /// The blocked product on one thread: K in blocks of KC, B in blocks of NC columns packed
    /// once per block, A in blocks of MC rows packed once per (K, B) block.
    #[allow(clippy::too_many_arguments)]
    unsafe fn serial(m: usize, n: usize, k: usize, c: *mut f32, c_rs: usize, accumulate: bool, a: View, b: View, alpha: f32) {
        let mut pa = PACK_A.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let mut pb = PACK_B.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let kc_max = KC.min(k);
        // Several column blocks (the output head's 49,152 columns) would pack the same A once
        // per block: where A is small enough, it is packed whole in the first block and kept,
        // its (K block, row block) panels at (pc / KC)·m_pad·KC + ic·kc.
        let m_pad = m.next_multiple_of(MR);
        let whole_a = n > NC && m_pad * k <= WHOLE_A;
        let need_a = if whole_a { m_pad * k } else { MC.min(m_pad) * kc_max };
        let need_b = NC.min(n).next_multiple_of(NR) * kc_max;
        if pa.len() < need_a {
            pa.resize(need_a, 0.0);
        }
        if pb.len() < need_b {
            pb.resize(need_b, 0.0);
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_avx512(&mut pb, b, pc, kc, jc, nc, NR, false);
                let acc = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let a_at = if whole_a { (pc / KC) * m_pad * KC + ic * kc } else { 0 };
                    if !whole_a || jc == 0 {
                        pack_avx512(&mut pa[a_at..], a, ic, mc, pc, kc, MR, true);
                    }
                    let pa_block = pa.as_ptr().add(a_at);
                    for j in (0..nc).step_by(NR) {
                        let cols = NR.min(nc - j);
                        let bp = pb.as_ptr().add(j * kc);
                        let (m0, m1) = if cols >= 16 { (lanes(16), lanes(cols - 16)) } else { (lanes(cols), 0) };
                        for i in (0..mc).step_by(MR) {
                            let ap = pa_block.add(i * kc);
                            kernel(kc, ap, bp, c.add((ic + i) * c_rs + jc + j), c_rs, MR.min(mc - i), m0, m1, acc, alpha);
                        }
                    }
                }
            }
        }
        PACK_A.with(|p| *p.borrow_mut() = pa);
        PACK_B.with(|p| *p.borrow_mut() = pb);
    }

    /// How far ahead along a row the transposing pack prefetches (floats).
    const PREFETCH: usize = 64;

    /// Source lines the contiguous pack reads side by side (each panel then takes that many
    /// rows in one visit).
    const LINES: usize = 8;

    /// The lowest `n` (≤ 16) lanes.
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// [`pack`] with 512-bit loads and stores where the operand is contiguous along one side:
    /// along the panel (a panel's row is one masked copy instead of a `memcpy` call), or along
    /// the depth (blocks of 16×16 read row by row and transposed in registers, instead of one
    /// scalar load per value from `w` rows apart). Other strides go through [`pack`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pack_avx512(dst: &mut [f32], v: View, r0: usize, rows: usize, c0: usize, cols: usize, w: usize, by_rows: bool) {
        let (extent, depth) = if by_rows { (rows, cols) } else { (cols, rows) };
        let (ps, ds) = if by_rows { (v.rs, v.cs) } else { (v.cs, v.rs) };
        if (ps != 1 && ds != 1) || w > NR {
            return pack(dst, v, r0, rows, c0, cols, w, by_rows);
        }
        let panels = extent.div_ceil(w);
        assert!(dst.len() >= panels * w * depth, "pack: the buffer is too small");
        let base = v.ptr.add(r0 * v.rs + c0 * v.cs);
        if ps == 1 {
            // Contiguous along the panels: one source line (depth d) at a time, across every
            // panel, so the source is read in order; the panels (in cache) take the scattered
            // writes. Panel by panel would touch a new line, often a new page, per value row.
            for d0 in (0..depth).step_by(LINES) {
                for idx in 0..panels {
                    let p0 = idx * w;
                    let live = w.min(extent - p0);
                    for d in d0..depth.min(d0 + LINES) {
                        let (src, out) = (base.add(d * ds + p0), dst.as_mut_ptr().add(idx * w * depth + d * w));
                        for q in (0..w).step_by(16) {
                            let (width, n) = (16.min(w - q), live.saturating_sub(q).min(16.min(w - q)));
                            // A block of padding only reads nothing (its address may lie past the source).
                            let x = if n == 0 { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(lanes(n), src.add(q)) };
                            _mm512_mask_storeu_ps(out.add(q), lanes(width), x);
                        }
                    }
                }
            }
            return;
        }
        for idx in 0..panels {
            let p0 = idx * w;
            let live = w.min(extent - p0);
            let out = dst.as_mut_ptr().add(idx * w * depth);
            for q in (0..w).step_by(16) {
                // This block's lanes of the panel, and how many of them hold values (the rest
                // are the zero padding).
                let (width, n) = (16.min(w - q), live.saturating_sub(q).min(16.min(w - q)));
                for d0 in (0..depth).step_by(16) {
                    let dl = 16.min(depth - d0);
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate().take(n) {
                        let row = base.add((p0 + q + i) * ps);
                        *ri = _mm512_maskz_loadu_ps(lanes(dl), row.add(d0));
                        if d0 + PREFETCH < depth {
                            _mm_prefetch::<_MM_HINT_T0>(row.add(d0 + PREFETCH) as *const i8);
                        }
                    }
                    let t = transpose16(&r);
                    for (j, tj) in t.iter().enumerate().take(dl) {
                        _mm512_mask_storeu_ps(out.add((d0 + j) * w + q), lanes(width), *tj);
                    }
                }
            }
        }
    }

    /// The transpose of 16 rows of 16 lanes: lane i of row j becomes lane j of row i. Rows are
    /// interleaved by 32-bit values, then 64-bit pairs (each 128-bit lane then holds a 4×4
    /// block transposed), then twice by 128-bit lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut x = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            // Lanes (group, column): x[c] = (0, c) (0, 8+c) (1, c) (1, 8+c); x[4+c] the same
            // for columns 4+c and 12+c; x[8+c] and x[12+c] for groups 2 and 3.
            x[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            x[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            x[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            x[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        }
        let mut o = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            o[c] = _mm512_shuffle_f32x4::<0x88>(x[c], x[8 + c]);
            o[8 + c] = _mm512_shuffle_f32x4::<0xDD>(x[c], x[8 + c]);
            o[4 + c] = _mm512_shuffle_f32x4::<0x88>(x[4 + c], x[12 + c]);
            o[12 + c] = _mm512_shuffle_f32x4::<0xDD>(x[4 + c], x[12 + c]);
        }
        o
    }

    /// C tile (`rows` ≤ MR rows × the columns the masks select) = α·Ap·Bp (+ C when `acc`),
    /// with Ap an MR-wide packed A panel and Bp an NR-wide packed B panel, both `kc` deep.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: usize,
        rows: usize,
        m0: u16,
        m1: u16,
        acc: bool,
        alpha: f32,
    ) {
        let mut s = [[_mm512_setzero_ps(); 2]; MR];
        let (mut ap, mut bp) = (ap, bp);
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for (i, si) in s.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ap.add(i));
                si[0] = _mm512_fmadd_ps(x, b0, si[0]);
                si[1] = _mm512_fmadd_ps(x, b1, si[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        let va = _mm512_set1_ps(alpha);
        for (i, si) in s.iter().enumerate() {
            if i < rows {
                let row = c.add(i * c_rs);
                let mut v0 = _mm512_mul_ps(si[0], va);
                let mut v1 = _mm512_mul_ps(si[1], va);
                if acc {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// [`gemm_with`] on slices, operands given as (row stride, column stride).
    #[allow(clippy::too_many_arguments)]
    fn run(
        kernel: Kernel,
        (m, n, k): (usize, usize, usize),
        c: &mut [f32],
        c_rs: usize,
        acc: bool,
        a: &[f32],
        a_st: (usize, usize),
        b: &[f32],
        b_st: (usize, usize),
        alpha: f32,
        parallel: bool,
    ) {
        assert!(m == 0 || c.len() >= (m - 1) * c_rs + n);
        // SAFETY: the tests' strides stay inside their slices, and C is checked above.
        unsafe {
            gemm_with(
                kernel,
                m,
                n,
                k,
                c.as_mut_ptr(),
                c_rs,
                acc,
                View { ptr: a.as_ptr(), rs: a_st.0, cs: a_st.1 },
                View { ptr: b.as_ptr(), rs: b_st.0, cs: b_st.1 },
                alpha,
                parallel,
            )
        }
    }

    /// C = α·A·B (+ C) in f64, element by element.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        c_rs: usize,
        acc: bool,
        a: &[f32],
        (a_rs, a_cs): (usize, usize),
        b: &[f32],
        (b_rs, b_cs): (usize, usize),
        alpha: f32,
    ) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64).sum();
                let old = if acc { c[i * c_rs + j] as f64 } else { 0.0 };
                c[i * c_rs + j] = (old + alpha as f64 * s) as f32;
            }
        }
    }

    /// Both kernels against the f64 reference on shapes around every block edge (MR, NR, KC,
    /// NC), with transposed operands, a C row stride wider than n, accumulation and α; C's
    /// padding columns must stay untouched.
    #[test]
    fn both_kernels_match_the_reference_on_edge_shapes_and_strides() {
        if !has_avx512() {
            eprintln!("this CPU has no AVX-512: Kernel::Avx512 falls back to the gemm crate here");
        }
        let shapes = [
            (1, 1, 1),
            (13, 15, 7),
            (14, 16, 256),
            (15, 17, 257),
            (29, 33, 300),
            (113, 64, 40),
            (3, 4097, 20),
            (130, 70, 530),
            (230, 2100, 300),
        ];
        for kernel in [Kernel::Avx512, Kernel::GemmCrate] {
            for &(m, n, k) in &shapes {
                for (ta, tb, acc, alpha, parallel) in [
                    (false, false, false, 1.0, true),
                    (true, false, true, 0.5, false),
                    (false, true, false, -2.0, true),
                    (true, true, true, 1.0, true),
                    // One thread: the whole columns of a wide B on one slab (A packed once).
                    (false, true, false, 1.0, false),
                ] {
                    let a = data(m * k, 1);
                    let b = data(k * n, 2);
                    // A is [m, k]: row-major or stored transposed ([k, m]); the same for B.
                    let a_st = if ta { (1, m) } else { (k, 1) };
                    let b_st = if tb { (1, k) } else { (n, 1) };
                    let c_rs = n + 3;
                    let init = data(m * c_rs, 3);
                    let mut want = init.clone();
                    reference(m, n, k, &mut want, c_rs, acc, &a, a_st, &b, b_st, alpha);
                    let mut got = init.clone();
                    run(kernel, (m, n, k), &mut got, c_rs, acc, &a, a_st, &b, b_st, alpha, parallel);
                    for i in 0..m {
                        for j in 0..c_rs {
                            let (g, w) = (got[i * c_rs + j], want[i * c_rs + j]);
                            if j >= n {
                                assert_eq!(g.to_bits(), init[i * c_rs + j].to_bits(), "{kernel:?} {m}x{n}x{k}: wrote padding ({i}, {j})");
                            } else {
                                assert!(
                                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                    "{kernel:?} {m}x{n}x{k} ta={ta} tb={tb} acc={acc}: ({i}, {j}) {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// matmul_with on each layout of the operands against the naive product, on both kernels.
    #[test]
    fn each_layout_of_the_operands_is_the_product_it_names() {
        let (m, k, n) = (37, 45, 53);
        let (a, b) = (data(m * k, 1), data(n * k, 2));
        // Element (i, j) of each operand as the layout lays it out.
        let at = |ops: Operands, i: usize, kk: usize| if ops == Operands::Tn { a[kk * m + i] } else { a[i * k + kk] };
        let bt = |ops: Operands, kk: usize, j: usize| if ops == Operands::Nt { b[j * k + kk] } else { b[kk * n + j] };
        for ops in [Operands::Nt, Operands::Nn, Operands::Tn] {
            for kernel in [Kernel::Avx512, Kernel::GemmCrate] {
                let c = matmul_with(kernel, ops, &a, m, k, &b, n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|kk| at(ops, i, kk) as f64 * bt(ops, kk, j) as f64).sum();
                        assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "{ops:?} {kernel:?} ({i}, {j}): {} vs {want}", c[i * n + j]);
                    }
                }
            }
        }
    }

    /// The vectorized packing writes the same panels as the scalar one, padding included, for
    /// both operands' panel widths, ragged extents and depths, and each kind of stride
    /// (contiguous along the panel, along the depth, and neither).
    #[test]
    fn the_vectorized_packing_equals_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if !has_avx512() {
                eprintln!("this CPU has no AVX-512: the vectorized packing is not used here");
                return;
            }
            let src = data(64 * 600, 5);
            for (w, by_rows) in [(MR, true), (NR, false)] {
                for (rows, cols) in [(1, 1), (13, 17), (14, 16), (33, 40), (40, 33), (45, 256), (256, 45)] {
                    // Row-major, column-major, and every other value of a wider matrix.
                    for (rs, cs) in [(cols + 3, 1), (1, rows + 2), (2 * cols + 1, 2)] {
                        let v = View { ptr: src.as_ptr(), rs, cs };
                        let (r0, c0) = (1, 1);
                        let (extent, depth) = if by_rows { (rows, cols) } else { (cols, rows) };
                        let len = extent.div_ceil(w) * w * depth;
                        let (mut want, mut got) = (vec![f32::NAN; len + 5], vec![f32::NAN; len + 5]);
                        // SAFETY: the views stay inside src (checked by the assert); the CPU has AVX-512.
                        assert!((r0 + rows) * rs + (c0 + cols) * cs < src.len());
                        unsafe {
                            pack(&mut want, v, r0, rows, c0, cols, w, by_rows);
                            avx512::pack_avx512(&mut got, v, r0, rows, c0, cols, w, by_rows);
                        }
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "w {w} {rows}x{cols} strides ({rs}, {cs})");
                    }
                }
            }
        }
    }

    /// The CPU family read through cpuid agrees with /proc/cpuinfo, and the kernel choice
    /// follows it: Zen 4 (AMD family 25) keeps the gemm crate, other AVX-512 CPUs take collm's.
    #[test]
    fn the_kernel_choice_follows_the_cpu_named_in_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let field = |k: &str| info.lines().find(|l| l.starts_with(k)).and_then(|l| l.split(':').nth(1)).map(|v| v.trim().to_string());
        let zen4 = field("vendor_id").as_deref() == Some("AuthenticAMD") && field("cpu family").as_deref() == Some("25");
        assert_eq!(half_width_avx512(), zen4, "cpuid and /proc/cpuinfo disagree on the family");
        if std::env::var_os("COLLM_GEMM").is_none() {
            let want = if has_avx512() && !zen4 { Kernel::Avx512 } else { Kernel::GemmCrate };
            assert_eq!(best_kernel(), want);
        }
    }

    /// [`Kernel::AmxBf16`] is the AMX tile product where the CPU has the tiles (the same bits as
    /// `amx::gemm_bf16`, which differ from the f32 product's), and the f32 product where it has
    /// not.
    #[test]
    fn the_amx_kernel_runs_the_tile_product_or_the_f32_one_without_tiles() {
        let (m, n, k) = (70, 90, 300);
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut got = vec![0f32; m * n];
        run(Kernel::AmxBf16, (m, n, k), &mut got, n, false, &a, (k, 1), &b, (1, k), 1.0, true);
        let mut want = vec![0f32; m * n];
        let (av, bv) = (View { ptr: a.as_ptr(), rs: k, cs: 1 }, View { ptr: b.as_ptr(), rs: 1, cs: k });
        // SAFETY: the views cover a and b; want is m × n.
        let tiles = unsafe { crate::amx::gemm_bf16(m, n, k, want.as_mut_ptr(), n, false, av, bv, 1.0, true) };
        let mut f32_product = vec![0f32; m * n];
        run(Kernel::Avx512, (m, n, k), &mut f32_product, n, false, &a, (k, 1), &b, (1, k), 1.0, true);
        if !tiles {
            want = f32_product;
        } else {
            assert_ne!(want, f32_product, "the bf16 tile product should round differently from the f32 one");
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "tiles available: {tiles}");
    }

    /// Without accumulation C is written without being read: NaN in it must not leak through,
    /// and k = 0 gives zeros (or leaves C alone when accumulating).
    #[test]
    fn c_is_overwritten_not_read_and_k_zero_is_handled() {
        for kernel in [Kernel::Avx512, Kernel::GemmCrate] {
            let (m, n, k) = (20, 40, 9);
            let (a, b) = (data(m * k, 4), data(k * n, 5));
            let mut c = vec![f32::NAN; m * n];
            run(kernel, (m, n, k), &mut c, n, false, &a, (k, 1), &b, (n, 1), 1.0, true);
            assert!(c.iter().all(|v| v.is_finite()), "{kernel:?}: NaN from C leaked");
            let mut z = vec![f32::NAN; 6];
            run(kernel, (2, 3, 0), &mut z, 3, false, &a, (0, 1), &b, (3, 1), 1.0, true);
            assert_eq!(z, vec![0.0; 6]);
            let mut keep = vec![7.0f32; 6];
            run(kernel, (2, 3, 0), &mut keep, 3, true, &a, (0, 1), &b, (3, 1), 1.0, true);
            assert_eq!(keep, vec![7.0; 6]);
        }
    }
}
