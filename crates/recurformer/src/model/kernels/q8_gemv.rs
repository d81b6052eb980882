//! q8_0 matrix products for decode: `x Wᵀ` for 1 to [`MAX_ROWS`] rows of x against a q8_0
//! weight matrix (issue 20).
//!
//! Why not candle's quantised matmul: measured in BENCHMARKS.md ("Where a decode step goes"),
//! its x86 fast path (repacked tiles, AVX-512 VNNI) needs an input size that is a multiple of 256,
//! so every 576-wide matrix of the default model (q/k/v, o, gate, up, the mixers' and windowed
//! heads' projections) takes its generic per-column path, which ran at a third of the speed of
//! the 1536-wide down projection (gate + up 5.9 ms of a 16.6 ms step); and for 2 to 8 rows its
//! tiled path is slower than one row at a time (issue 22).
//!
//! The arithmetic is GGML's Q8_0 × Q8_0 dot product (as llama.cpp and candle compute it): each row
//! of x is quantised per block of 32 to 8 bits with one scale (d = max|x| / 127, stored as f16),
//! each block's integer dot product with the weight block is scaled by both blocks' scales and
//! summed in f32. So results equal candle's up to the order of the f32 sums. The loops are our
//! own: one pass over each weight row serves every row of x (the weights are read once per call,
//! whatever the number of rows), the 8-bit products use AVX2 (`vpmaddubsw` on |w| and x with w's
//! sign, as GGML's AVX2 path does), chosen at run time, with a portable scalar fallback; output
//! rows are split across candle's worker pool when the matrix is large enough to pay for it.

use crate::model::kernels::simd::Isa;
use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Tensor};
use half::f16;

/// Most rows of x one call takes; more go to the prefill GEMM (`q8_gemm`).
pub const MAX_ROWS: usize = 8;

/// Values per block, bytes per block (f16 scale + 32 × i8).
pub(crate) const QK: usize = 32;
pub(crate) const BLOCK_BYTES: usize = 34;

/// Below this many weights a matrix is done on one thread (dispatch would cost more than it
/// saves).
pub(crate) const PARALLEL_MIN_WEIGHTS: usize = 1 << 17;

/// Weight rows per work item of the thread pool.
pub(crate) const ROWS_PER_ITEM: usize = 16;

/// Whether the kernel is switched off in favour of candle's matmul: set
/// `RECURFORMER_CANDLE_QMATMUL=1` to time or check the old path. Read once.
pub(crate) fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("RECURFORMER_CANDLE_QMATMUL").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether candle's x86 fast path (repacked tiles, VNNI) takes a q8_0 matrix with `k` inputs,
/// whatever the number of rows (candle-core 0.11.1, `quantized/repack_x86.rs` `select`). It
/// rounds x per 256 values (Q8_K) where GGML's Q8_0 rounds per 32, so a decode step through the
/// kernel here would not reproduce the prefill of the same matrix bit for bit (0.5 % apart);
/// such matrices stay with candle for every row count, and cached decode keeps equal to a full
/// forward. Measured on one thread, both run at the same speed there (BENCHMARKS.md).
pub(crate) fn candle_repacks(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let vnni = *VNNI.get_or_init(|| {
            (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
                || (is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2"))
        });
        vnni && k % 256 == 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// `x Wᵀ` through `q`: x (m, k) -> (m, n), with the kernel here when it applies (q8_0 weights,
/// f32 x on the CPU, 1..=MAX_ROWS rows, a matrix candle does not repack), the prefill GEMM of
/// `q8_gemm` for more rows of such a matrix, and candle's quantised matmul otherwise.
pub fn qmatmul(q: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(0);
    if !disabled() && !candle_repacks(k) {
        if let Some(y) = q8_0_matmul_on(Isa::detect(), q, x)? {
            return Ok(y);
        }
        if !crate::model::kernels::q8_gemm::disabled() {
            let isa = crate::model::kernels::q8_gemm::GemmIsa::detect();
            if let Some(y) = crate::model::kernels::q8_gemm::q8_0_gemm_on(isa, q, x)? {
                return Ok(y);
            }
        }
    }
    Ok(candle_core::Module::forward(q, &x.contiguous()?)?)
}

/// The kernel on the instruction set `isa`: None when it does not apply (see [`qmatmul`]).
pub fn q8_0_matmul_on(isa: Isa, q: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let QMatMul::QTensor(w) = q else {
        return Ok(None);
    };
    if w.dtype() != GgmlDType::Q8_0 || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let Ok((m, k)) = x.dims2() else {
        return Ok(None);
    };
    let Ok((n, wk)) = w.shape().dims2() else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS || k % QK != 0 {
        return Ok(None);
    }
    if wk != k {
        anyhow::bail!("q8_0 matmul: input has {k} columns, the weight matrix is ({n}, {wk})");
    }
    let data = w.data()?;
    let kb = k / QK;
    if data.len() != n * kb * BLOCK_BYTES {
        anyhow::bail!(
            "q8_0 matmul: weight storage holds {} bytes, expected {} for ({n}, {k})",
            data.len(),
            n * kb * BLOCK_BYTES
        );
    }
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let xq = quantize_rows(&xs, m, k);
    // Output computed transposed, (n, m): each work item owns a run of weight rows.
    let mut yt = vec![0f32; n * m];
    let task = |r0: usize, out: &mut [f32]| {
        let rows = out.len() / m;
        let w = &data[r0 * kb * BLOCK_BYTES..(r0 + rows) * kb * BLOCK_BYTES];
        gemv_rows(isa, w, kb, &xq, m, out);
    };
    if n * k >= PARALLEL_MIN_WEIGHTS {
        // candle's own worker pool (the one its quantised matmuls use), so that the two kinds
        // of matmul in a step do not keep two sets of spinning threads on the same cores.
        let items = n.div_ceil(ROWS_PER_ITEM);
        let yt_ptr = yt.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            for it in range {
                let r0 = it * ROWS_PER_ITEM;
                let rows = ROWS_PER_ITEM.min(n - r0);
                // SAFETY: items cover disjoint row ranges of `yt`, which outlives the call.
                let out = unsafe {
                    std::slice::from_raw_parts_mut((yt_ptr as *mut f32).add(r0 * m), rows * m)
                };
                task(r0, out);
            }
        });
    } else {
        task(0, &mut yt);
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for r in 0..m {
            y[r * n + j] = yt[j * m + r];
        }
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// x quantised per block as GGML's Q8_0: scales (m, kb) (the f16-rounded value, as the dot
/// product uses it) and values (m, k).
pub(crate) struct QuantRows {
    pub(crate) d: Vec<f32>,
    pub(crate) qs: Vec<i8>,
}

pub(crate) fn quantize_rows(xs: &[f32], m: usize, k: usize) -> QuantRows {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() >= Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (and so SSE4.1).
        return unsafe { quantize_rows_avx2(xs, m, k) };
    }
    quantize_rows_portable(xs, m, k)
}

/// [`quantize_rows`] compiled for AVX2: the same code, but `f32::round` (half away from zero, as
/// GGML's `roundf`) becomes an exact add-and-truncate (`vroundps`) instead of a call into libm,
/// which took 5 % of a 2K-token prefill (perf), and the loops vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,sse4.1")]
unsafe fn quantize_rows_avx2(xs: &[f32], m: usize, k: usize) -> QuantRows {
    quantize_rows_portable(xs, m, k)
}

#[inline(always)]
fn quantize_rows_portable(xs: &[f32], m: usize, k: usize) -> QuantRows {
    let kb = k / QK;
    let mut d = vec![0f32; m * kb];
    let mut qs = vec![0i8; m * k];
    for (bi, (xb, qb)) in xs.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        d[bi] = f16::from_f32(db).to_f32();
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
        }
    }
    QuantRows { d, qs }
}

/// out (rows, m) = the dot products of each weight row in `w` (rows × kb blocks) with each row of
/// x.
pub(crate) fn gemv_rows(isa: Isa, w: &[u8], kb: usize, x: &QuantRows, m: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa` only names a SIMD set the CPU was found to have.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::gemv_rows_avx2(w, kb, x, m, out) },
        _ => gemv_rows_scalar(w, kb, x, m, out),
    }
}

fn gemv_rows_scalar(w: &[u8], kb: usize, x: &QuantRows, m: usize, out: &mut [f32]) {
    for (row, o) in w
        .chunks_exact(kb * BLOCK_BYTES)
        .zip(out.chunks_exact_mut(m))
    {
        o.fill(0.0);
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let wq = &blk[2..];
            for (r, acc) in o.iter_mut().enumerate() {
                let xq = &x.qs[(r * kb + b) * QK..(r * kb + b + 1) * QK];
                let isum: i32 = wq
                    .iter()
                    .zip(xq)
                    .map(|(&a, &c)| (a as i8) as i32 * c as i32)
                    .sum();
                *acc += dw * x.d[r * kb + b] * isum as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantRows, BLOCK_BYTES, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One weight row against M rows of x.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dots<const M: usize>(
        row: &[u8],
        kb: usize,
        x: &QuantRows,
        r0: usize,
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); M];
        let rp = row.as_ptr();
        for b in 0..kb {
            let blk = rp.add(b * BLOCK_BYTES);
            let bits = u16::from_le_bytes([*blk, *blk.add(1)]) as i32;
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv); // |w| as unsigned bytes
            for (r, a) in acc.iter_mut().enumerate() {
                let xi = (r0 + r) * kb + b;
                let xv = _mm256_loadu_si256(x.qs.as_ptr().add(xi * QK) as *const __m256i);
                let sx = _mm256_sign_epi8(xv, wv); // x with w's sign
                let p16 = _mm256_maddubs_epi16(aw, sx); // pairs: at most 2 * 127 * 127, no saturation
                let p32 = _mm256_madd_epi16(p16, ones);
                let s = _mm256_set1_ps(dw * *x.d.get_unchecked(xi));
                *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p32), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[r] = hsum(*a);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_rows_avx2(
        w: &[u8],
        kb: usize,
        x: &QuantRows,
        m: usize,
        out: &mut [f32],
    ) {
        for (row, o) in w
            .chunks_exact(kb * BLOCK_BYTES)
            .zip(out.chunks_exact_mut(m))
        {
            // Rows of x in groups of up to 4 (accumulators stay in registers).
            let mut r0 = 0;
            while r0 < m {
                let left = m - r0;
                let o = &mut o[r0..];
                match left {
                    1 => row_dots::<1>(row, kb, x, r0, o),
                    2 => row_dots::<2>(row, kb, x, r0, o),
                    3 => row_dots::<3>(row, kb, x, r0, o),
                    _ => row_dots::<4>(row, kb, x, r0, o),
                }
                r0 += left.min(4);
            }
        }
    }
}
