//! Matrix products on Intel's AMX tiles in bf16, summed in f32: C = α·bf16(A)·bf16(B) (+ C).
//!
//! A CPU with AMX (Sapphire Rapids and later Xeons) multiplies a 16×32 tile of bf16 values by a
//! 32×16 one into a 16×16 tile of f32 sums in one instruction (`tdpbf16ps`): a probe on a 2-core
//! Xeon VM measured about 1.9 TFLOPS on one core, against about 0.15 for f32 FMAs at 512 bits.
//! The operands are rounded to bf16 (to nearest, ties to even) as they are packed, so the product
//! is that of the rounded operands, not the f32 one: a precision for bf16 models and bf16
//! weights, never a stand-in for [`crate::sgemm`]'s f32 products.
//!
//! Layout, as the tile instructions read it: A is packed in blocks of 32 rows, each K step of 32
//! as 32 rows of 32 bf16 (two 16-row tiles); B in panels of 32 columns, each K step of 32 as two
//! 16-column tiles of 16 rows, row p holding the pairs (B[2p][j], B[2p+1][j]) for its 16 columns
//! (the "VNNI" order). K, the rows and the columns are zero-padded to 32. The micro-kernel keeps
//! a 32×32 block of C in four tiles over the whole depth, and then adds it into C.
//!
//! Rust has no stable AMX intrinsics; the tile instructions go through `asm!`, whose assembler
//! knows them. Linux hands a process the tile state only on request (`arch_prctl`), made once in
//! [`available`].

use crate::sgemm::View;
use std::cell::RefCell;

/// Whether this CPU and OS run AMX bf16 tile products: the CPU reports AMX-TILE, AMX-BF16 and
/// AVX512-BF16 (the packing's conversion), and Linux granted this process the tile data state.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !std::is_x86_feature_detected!("avx512bf16") {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: the request only changes which state this process may use.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

thread_local! {
    static PACK_A: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static PACK_B: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// C[m, n] = α·bf16(A)[m, k]·bf16(B)[k, n] (+ C when `accumulate`), sums in f32; C row-major with
/// row stride `c_rs`; `parallel` spreads the work over the rayon threads. Without `accumulate` C
/// is only written. Returns false, touching nothing, where [`available`] is false.
///
/// # Safety
/// Every element of A, B and C that the views and sizes name must be valid (C for writing).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16(
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
) -> bool {
    if !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let threads = if parallel && (m as f64) * (n as f64) * (k as f64) >= 3.2e7 { rayon::current_num_threads() } else { 1 };
        if threads <= 1 {
            tiles::serial(m, n, k, c, c_rs, accumulate, a, b, alpha);
            return true;
        }
        // Slabs of C across its longer side, each packed and multiplied by one thread.
        crate::sgemm::over_slabs(m, n, c, c_rs, a, b, threads, (32, 32), |rows, cols, c, a, b| {
            tiles::serial(rows, cols, k, c, c_rs, accumulate, a, b, alpha)
        });
    }
    true
}

/// C = bf16(A)·bf16(B)ᵀ for row-major A [m, k] and B [n, k] (a linear layer's x·Wᵀ), on all
/// threads; None where [`available`] is false.
pub fn matmul_nt_bf16(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Option<Vec<f32>> {
    assert!(a.len() >= m * k && b.len() >= n * k, "matmul_nt_bf16: operands shorter than their shapes");
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let (av, bv) = (View { ptr: a.as_ptr(), rs: k, cs: 1 }, View { ptr: b.as_ptr(), rs: 1, cs: k });
    // SAFETY: the views cover a and b (checked above); C has room for m × n, and gemm_bf16 writes
    // every element of it (it only reads C when accumulating) before the length is set.
    unsafe {
        if !gemm_bf16(m, n, k, c.as_mut_ptr(), n, false, av, bv, 1.0, true) {
            return None;
        }
        c.set_len(m * n);
    }
    Some(c)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::*;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The tile configuration: palette 1, tiles 0–7 each 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            // colsb[t] (u16 at 16 + 2t) = 64 bytes; rows[t] (u8 at 48 + t) = 16.
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        Config(c)
    }

    /// A bf16 value's bits from an f32, rounded to nearest, ties to even (NaN stays NaN).
    fn bf16_bits(v: f32) -> u16 {
        half::bf16::from_f32(v).to_bits()
    }

    /// The lowest `n` (≤ 16) lanes.
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Packs rows r0..r0+rows (≤ 32) of A, all k, into `dst`: per K step of 32, 32 rows of 32 bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_a(dst: &mut [u16], a: View, r0: usize, rows: usize, k: usize) {
        let steps = k.div_ceil(32);
        dst[..steps * 1024].fill(0);
        if a.rs == 1 && a.cs != 1 {
            // Contiguous along the rows (A = dyᵀ in a weight's gradient): 16×16 blocks of
            // (depth, row) read a depth at a time, transposed in registers, two depth blocks
            // converted together into a row's 32 bf16.
            for s in 0..steps {
                let k0 = s * 32;
                for h in 0..2 {
                    let live = rows.saturating_sub(16 * h).min(16);
                    if live == 0 {
                        continue;
                    }
                    let mut t = [[_mm512_setzero_ps(); 16]; 2];
                    for (half, th) in t.iter_mut().enumerate() {
                        let d0 = k0 + 16 * half;
                        let depth = k.saturating_sub(d0).min(16);
                        let mut r = [_mm512_setzero_ps(); 16];
                        for (d, rd) in r.iter_mut().enumerate().take(depth) {
                            *rd = _mm512_maskz_loadu_ps(lanes(live), a.ptr.add((d0 + d) * a.cs + r0 + 16 * h));
                        }
                        *th = crate::sgemm::transpose16(&r);
                    }
                    for i in 0..live {
                        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(t[1][i], t[0][i]));
                        _mm512_storeu_si512(dst.as_mut_ptr().add(s * 1024 + (16 * h + i) * 32) as *mut __m512i, v);
                    }
                }
            }
            return;
        }
        for i in 0..rows {
            let row = a.ptr.add((r0 + i) * a.rs);
            for s in 0..steps {
                let (k0, out) = (s * 32, dst.as_mut_ptr().add(s * 1024 + i * 32));
                if a.cs == 1 {
                    let (n0, n1) = ((k - k0).min(16), (k - k0).saturating_sub(16).min(16));
                    let lo = _mm512_maskz_loadu_ps(lanes(n0), row.add(k0));
                    let hi = if n1 == 0 { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(lanes(n1), row.add(k0 + 16)) };
                    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(out as *mut __m512i, v);
                } else {
                    for kk in k0..k.min(k0 + 32) {
                        *out.add(kk - k0) = bf16_bits(*row.add(kk * a.cs));
                    }
                }
            }
        }
    }

    /// Packs columns c0..c0+cols (≤ 32) of B, all k, into `dst`: per K step of 32, two tiles of
    /// 16 columns, row p of a tile the pairs (B[2p][j], B[2p+1][j]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_b(dst: &mut [u16], b: View, c0: usize, cols: usize, k: usize) {
        let steps = k.div_ceil(32);
        dst[..steps * 1024].fill(0);
        let at = |s: usize, h: usize, p: usize| s * 1024 + h * 512 + p * 32;
        if b.rs == 1 {
            // Contiguous along K (B = Wᵀ): a column's 32 values are one pair row of 16 pairs;
            // 16 columns' pair rows, transposed as 32-bit lanes, are the tile's rows.
            for h in 0..2 {
                let live = cols.saturating_sub(16 * h).min(16);
                if live == 0 {
                    continue;
                }
                for s in 0..steps {
                    let k0 = s * 32;
                    let (n0, n1) = ((k - k0).min(16), (k - k0).saturating_sub(16).min(16));
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (j, rj) in r.iter_mut().enumerate().take(live) {
                        let col = b.ptr.add((c0 + 16 * h + j) * b.cs + k0);
                        let lo = _mm512_maskz_loadu_ps(lanes(n0), col);
                        let hi = if n1 == 0 { _mm512_setzero_ps() } else { _mm512_maskz_loadu_ps(lanes(n1), col.add(16)) };
                        *rj = std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo));
                    }
                    let t = crate::sgemm::transpose16(&r);
                    for (p, tp) in t.iter().enumerate() {
                        _mm512_storeu_ps(dst.as_mut_ptr().add(at(s, h, p)) as *mut f32, *tp);
                    }
                }
            }
        } else if b.cs == 1 {
            // Rows contiguous (B = W): two rows' 16 columns, converted together and interleaved.
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for h in 0..2 {
                let live = cols.saturating_sub(16 * h).min(16);
                if live == 0 {
                    continue;
                }
                for kk in (0..k).step_by(2) {
                    let r0 = _mm512_maskz_loadu_ps(lanes(live), b.ptr.add(kk * b.rs + c0 + 16 * h));
                    let r1 = if kk + 1 < k {
                        _mm512_maskz_loadu_ps(lanes(live), b.ptr.add((kk + 1) * b.rs + c0 + 16 * h))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(r1, r0));
                    let (s, p) = (kk / 32, (kk % 32) / 2);
                    _mm512_storeu_si512(dst.as_mut_ptr().add(at(s, h, p)) as *mut __m512i, _mm512_permutexvar_epi16(idx, v));
                }
            }
        } else {
            for j in 0..cols {
                for kk in 0..k {
                    let (s, p, e) = (kk / 32, (kk % 32) / 2, kk % 2);
                    dst[at(s, j / 16, p) + 2 * (j % 16) + e] = bf16_bits(*b.ptr.add(kk * b.rs + (c0 + j) * b.cs));
                }
            }
        }
    }

    /// The 32×32 block of sums of a packed A block and a packed B panel over `steps` K steps of
    /// 32, into `out` as four 16×16 tiles (rows 0–15 × columns 0–15, 0–15 × 16–31, 16–31 × 0–15,
    /// 16–31 × 16–31), each row-major. The tile configuration must be loaded.
    unsafe fn block(ap: *const u16, bp: *const u16, steps: usize, out: &mut [f32; 1024]) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {s}]",
            "tileloadd tmm5, [{a} + {s} + 1024]",
            "tileloadd tmm6, [{b} + {s}]",
            "tileloadd tmm7, [{b} + {s} + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 2b",
            "tilestored [{o} + {s}], tmm0",
            "tilestored [{o} + {s} + 1024], tmm1",
            "tilestored [{o} + {s} + 2048], tmm2",
            "tilestored [{o} + {s} + 3072], tmm3",
            a = inout(reg) ap => _,
            b = inout(reg) bp => _,
            n = inout(reg) steps => _,
            s = in(reg) 64usize,
            o = in(reg) out.as_mut_ptr(),
            options(nostack),
        );
    }

    /// C[..rows, ..cols] = α·block (+ C when `accumulate`), the block as [`block`] leaves it.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(out: &[f32; 1024], c: *mut f32, c_rs: usize, rows: usize, cols: usize, accumulate: bool, alpha: f32) {
        let va = _mm512_set1_ps(alpha);
        for i in 0..rows {
            for h in 0..cols.div_ceil(16) {
                let mask = lanes((cols - 16 * h).min(16));
                let dst = c.add(i * c_rs + 16 * h);
                let mut v = _mm512_mul_ps(va, _mm512_loadu_ps(out.as_ptr().add((i / 16) * 512 + h * 256 + (i % 16) * 16)));
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
                }
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }

    /// The product on one thread: B packed whole (its panels of 32 columns), then each block of
    /// 32 rows of A packed and multiplied by every panel.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn serial(m: usize, n: usize, k: usize, c: *mut f32, c_rs: usize, accumulate: bool, a: View, b: View, alpha: f32) {
        let steps = k.div_ceil(32);
        if steps == 0 {
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(c.add(i * c_rs), n);
                if !accumulate {
                    row.fill(0.0);
                }
            }
            return;
        }
        let mut pa = PACK_A.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let mut pb = PACK_B.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let panels = n.div_ceil(32);
        let panel_len = steps * 1024;
        if pb.len() < panels * panel_len {
            pb.resize(panels * panel_len, 0);
        }
        if pa.len() < panel_len {
            pa.resize(panel_len, 0);
        }
        for q in 0..panels {
            pack_b(&mut pb[q * panel_len..], b, q * 32, (n - q * 32).min(32), k);
        }
        let cfg = config();
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const Config, options(nostack));
        let mut out = [0f32; 1024];
        for i0 in (0..m).step_by(32) {
            let rows = (m - i0).min(32);
            pack_a(&mut pa, a, i0, rows, k);
            for q in 0..panels {
                block(pa.as_ptr(), pb.as_ptr().add(q * panel_len), steps, &mut out);
                store(&out, c.add(i0 * c_rs + q * 32), c_rs, rows, (n - q * 32).min(32), accumulate, alpha);
            }
        }
        asm!("tilerelease", options(nostack));
        PACK_A.with(|p| *p.borrow_mut() = pa);
        PACK_B.with(|p| *p.borrow_mut() = pb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    fn round(v: f32) -> f64 {
        half::bf16::from_f32(v).to_f64()
    }

    /// Against an f64 product of the operands rounded to bf16, on shapes around the tile edges
    /// (32 rows, 32 columns, K steps of 32), each layout the packing reads (row-major, transposed,
    /// strided both ways), with accumulation and α; the threaded product equals the one-thread one
    /// bit for bit, and C's padding columns stay untouched.
    #[test]
    fn tile_products_match_the_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("this CPU or OS has no AMX bf16 tiles: gemm_bf16 declines, and nothing here can be checked");
            let mut c = [7.0f32];
            let v = View { ptr: [1.0f32].as_ptr(), rs: 1, cs: 1 };
            // SAFETY: 1×1 operands.
            assert!(!unsafe { gemm_bf16(1, 1, 1, c.as_mut_ptr(), 1, false, v, v, 1.0, false) });
            assert_eq!(c, [7.0]);
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(m, n, k) in &[(1, 1, 1), (31, 33, 17), (32, 32, 32), (33, 65, 70), (100, 300, 530), (700, 90, 300), (5, 40, 0)] {
            // (A row-major or transposed, B: 0 row-major, 1 transposed, 2 strided).
            for (ta, tb, acc, alpha) in
                [(false, 0, false, 1.0f32), (true, 1, true, 0.5), (false, 1, false, -2.0), (true, 2, true, 1.0), (false, 2, false, 1.0)]
            {
                let a = data(m * k, 1);
                let b = data(2 * (k * n + n + k) + 1, 2);
                let a_st = if ta { (1, m) } else { (k, 1) };
                let b_st = match tb {
                    0 => (n, 1),
                    1 => (1, k),
                    _ => (2 * n + 1, 2),
                };
                let c_rs = n + 3;
                let init = data(m * c_rs, 3);
                let (av, bv) = (View { ptr: a.as_ptr(), rs: a_st.0, cs: a_st.1 }, View { ptr: b.as_ptr(), rs: b_st.0, cs: b_st.1 });
                let (mut one, mut many) = (init.clone(), init.clone());
                // SAFETY: the views stay inside a and b (b is sized for the strided layout), C holds m rows of c_rs.
                unsafe {
                    assert!(gemm_bf16(m, n, k, one.as_mut_ptr(), c_rs, acc, av, bv, alpha, false));
                    let (c, a, b) = (crate::sgemm::Shared(many.as_mut_ptr()), crate::sgemm::Shared(av), crate::sgemm::Shared(bv));
                    pool.install(move || {
                        let (c, a, b) = (c, a, b);
                        assert!(gemm_bf16(m, n, k, c.0, c_rs, acc, a.0, b.0, alpha, true))
                    });
                }
                let what = format!("{m}x{n}x{k} ta={ta} tb={tb} acc={acc}");
                assert!(one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: the threaded product differs");
                for i in 0..m {
                    for j in 0..c_rs {
                        let got = one[i * c_rs + j];
                        if j >= n {
                            assert_eq!(got.to_bits(), init[i * c_rs + j].to_bits(), "{what}: wrote padding ({i}, {j})");
                            continue;
                        }
                        let terms = (0..k).map(|p| round(a[i * a_st.0 + p * a_st.1]) * round(b[p * b_st.0 + j * b_st.1]));
                        let (sum, scale) = terms.fold((0.0, 0.0), |(s, l): (f64, f64), t| (s + t, l + t.abs()));
                        let want = alpha as f64 * sum + if acc { init[i * c_rs + j] as f64 } else { 0.0 };
                        let tol = 1e-5 * (alpha.abs() as f64 * scale + 1.0);
                        assert!((got as f64 - want).abs() <= tol, "{what}: ({i}, {j}) {got} vs {want}");
                    }
                }
            }
        }
    }
}
