//! q8_0 matrix products for prefill: `x Wᵀ` for more than [`MAX_ROWS`] rows of x against a q8_0
//! weight matrix (issue 20).
//!
//! Why not candle's quantised matmul: profiled with `perf` on a 512-token prefill of SmolLM2-135M
//! in q8_0 (BENCHMARKS.md, "Where a prefill goes"), 78 % of the time went to candle's generic
//! q8_0 path — `vec_dot_q8_0_q8_0` one (row, column) pair at a time, converting each block's f16
//! scale through the `half` crate, and quantising x row by row — because its x86 fast path
//! (repacked tiles, VNNI) takes only input sizes that are multiples of 256, and every 576-wide
//! matrix of that model (q/k/v, o, gate, up, the mixers' stacked projections) is not.
//!
//! The arithmetic is GGML's Q8_0 × Q8_0 dot product, the same as the decode kernel's
//! (`q8_gemv`) and candle's: x is quantised per block of 32 (d = max|x| / 127 rounded to f16,
//! values rounded to 8 bits), each block's integer dot product with the weight block is scaled
//! by both scales and summed in f32. Results equal the decode kernel's up to the order of the f32
//! sums, so cached decode still equals a full forward. Matrices candle repacks (input size a
//! multiple of 256 on a VNNI CPU) stay with candle for every row count, as in `q8_gemv`.
//!
//! The loops are our own. With AVX-512 VNNI (`vpdpbusd`: 64 unsigned × signed byte products
//! summed in fours into 16 i32 lanes per instruction), a tile of 4 weight rows × 4 rows of x is
//! held in 16 f32 accumulators, two blocks (64 bytes) per step. `vpdpbusd` needs one unsigned
//! operand: x is stored offset by +128 (1..=255), and the offset's contribution, 128 Σ w per
//! lane, is subtracted by starting each step's integer sum at −128 Σ w (computed once per weight
//! tile with a `vpdpbusd` against ones); the weight rows of a tile are first copied out of their
//! 34-byte blocks into contiguous bytes with their scales as f32. Without VNNI, the decode
//! kernel's row loops (AVX2 `vpmaddubsw` with the sign trick, or scalar) run over all rows of x.
//! The instruction set is chosen at run time; rows of W are split over candle's worker pool.

use crate::model::kernels::q8_gemv::{
    candle_repacks, gemv_rows, q8_0_operands, Q8Operands, BLOCK_BYTES, MAX_ROWS,
    PARALLEL_MIN_WEIGHTS, QK, ROWS_PER_ITEM,
};
use crate::model::kernels::simd::Isa;
use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::Tensor;

/// Whether this GEMM is switched off in favour of candle's matmul for prefill: set
/// `RECURFORMER_CANDLE_GEMM=1` to time or check the old path. Read once.
pub fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("RECURFORMER_CANDLE_GEMM").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// The instruction set the GEMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GemmIsa {
    /// The decode kernel's scalar row loops.
    Scalar,
    /// The decode kernel's AVX2 row loops (`vpmaddubsw`), 4 rows of x per pass over a weight row.
    Avx2,
    /// AVX-512 with BW and VNNI: the 4 × 4 tile kernel here.
    Avx512Vnni,
}

impl GemmIsa {
    /// The best set this CPU has, under the cap of `RECURFORMER_ISA` ([`Isa::detect`]).
    pub fn detect() -> GemmIsa {
        let best = Self::available()
            .into_iter()
            .max()
            .unwrap_or(GemmIsa::Scalar);
        match Isa::detect() {
            Isa::Scalar => GemmIsa::Scalar,
            Isa::Avx2 => best.min(GemmIsa::Avx2),
            Isa::Avx512 => best,
        }
    }

    /// Every set this CPU can run (tests run the GEMM on each).
    pub fn available() -> Vec<GemmIsa> {
        let mut v = vec![GemmIsa::Scalar];
        let isas = Isa::available();
        if isas.contains(&Isa::Avx2) {
            v.push(GemmIsa::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if isas.contains(&Isa::Avx512)
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(GemmIsa::Avx512Vnni);
        }
        v
    }

    fn rows_isa(self) -> Isa {
        match self {
            GemmIsa::Scalar => Isa::Scalar,
            _ => Isa::Avx2,
        }
    }
}

/// `x Wᵀ` for x (m, k) with m > [`MAX_ROWS`] and W (n, k) in q8_0, on `isa`: (m, n). None when it
/// does not apply (not q8_0, not f32 on the CPU, too few rows, k not whole blocks, or a matrix
/// candle repacks: see the module comment).
pub fn q8_0_gemm_on(isa: GemmIsa, q: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let takes = |m: usize, k: usize| m > MAX_ROWS && !candle_repacks(k);
    let Some(Q8Operands { data, m, n, k, xq }) = q8_0_operands(q, x, takes, "q8_0 gemm")? else {
        return Ok(None);
    };
    let kb = k / QK;
    let mut y = vec![0f32; m * n];
    let y_ptr = y.as_mut_ptr() as usize;
    // Work item `it`: weight rows [it * ROWS_PER_ITEM, ..), i.e. those columns of y.
    let prepared = Prepared::new(isa, &xq, m, k);
    let item = |it: usize| {
        let r0 = it * ROWS_PER_ITEM;
        let rows = ROWS_PER_ITEM.min(n - r0);
        let w = &data[r0 * kb * BLOCK_BYTES..(r0 + rows) * kb * BLOCK_BYTES];
        // SAFETY: items write disjoint columns [r0, r0 + rows) of y (m, n), which outlives the
        // call.
        unsafe { prepared.columns(w, rows, y_ptr as *mut f32, n, r0) };
    };
    let items = n.div_ceil(ROWS_PER_ITEM);
    if n * k >= PARALLEL_MIN_WEIGHTS {
        // candle's worker pool, as the decode kernel (one set of threads for both).
        candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(item));
    } else {
        (0..items).for_each(item);
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// x quantised once per call, in the layout the chosen loops read.
enum Prepared<'a> {
    /// The decode kernel's layout (`QuantRows`).
    Rows {
        isa: Isa,
        xq: &'a crate::model::kernels::q8_gemv::QuantRows,
        m: usize,
        kb: usize,
    },
    /// For the VNNI tiles: values + 128 as bytes, each row padded with zeros to whole steps of
    /// 64 (`kp`), and scales padded likewise to `kp / 32` per row.
    Vnni {
        xu: Vec<u8>,
        d: Vec<f32>,
        m: usize,
        kb: usize,
        kp: usize,
    },
}

impl<'a> Prepared<'a> {
    fn new(
        isa: GemmIsa,
        xq: &'a crate::model::kernels::q8_gemv::QuantRows,
        m: usize,
        k: usize,
    ) -> Self {
        let kb = k / QK;
        match isa {
            GemmIsa::Avx512Vnni => {
                let kp = k.div_ceil(64) * 64;
                let mut xu = vec![0u8; m * kp];
                let mut d = vec![0f32; m * kp / QK];
                for r in 0..m {
                    for (u, &v) in xu[r * kp..r * kp + k]
                        .iter_mut()
                        .zip(&xq.qs[r * k..(r + 1) * k])
                    {
                        *u = (v as i16 + 128) as u8;
                    }
                    d[r * kp / QK..r * kp / QK + kb].copy_from_slice(&xq.d[r * kb..(r + 1) * kb]);
                }
                Prepared::Vnni { xu, d, m, kb, kp }
            }
            other => Prepared::Rows {
                isa: other.rows_isa(),
                xq,
                m,
                kb,
            },
        }
    }

    /// Columns [c0, c0 + rows) of y (m, n): the products of x with the `rows` weight rows in `w`.
    ///
    /// # Safety
    /// `y` points to m * n f32 that no other thread writes in these columns.
    unsafe fn columns(&self, w: &[u8], rows: usize, y: *mut f32, n: usize, c0: usize) {
        match self {
            Prepared::Rows { isa, xq, m, kb } => {
                // (rows, m): each weight row against every row of x.
                let mut out = vec![0f32; rows * m];
                gemv_rows(*isa, w, *kb, xq, *m, &mut out);
                for j in 0..rows {
                    for r in 0..*m {
                        *y.add(r * n + c0 + j) = out[j * m + r];
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::Vnni { xu, d, m, kb, kp } => {
                let mut tile = x86::WeightTile::new(*kp);
                let mut j = 0;
                while j < rows {
                    let nr = (rows - j).min(x86::NR);
                    tile.load(
                        &w[j * kb * BLOCK_BYTES..(j + nr) * kb * BLOCK_BYTES],
                        nr,
                        *kb,
                    );
                    x86::tile_rows(&tile, xu, d, *m, *kp, y, n, c0 + j);
                    j += nr;
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Prepared::Vnni { .. } => unreachable!("VNNI is only detected on x86-64"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_BYTES, QK};
    use std::arch::x86_64::*;

    /// Weight rows per tile, rows of x per tile.
    pub(super) const NR: usize = 4;
    const MR: usize = 4;

    /// Up to NR weight rows unpacked for the tile loop: values contiguous per row (padded with
    /// zeros to `kp`), per step of two blocks the scales spread over the 16 lanes (8 per block)
    /// and the offset correction −128 Σ w per lane.
    pub(super) struct WeightTile {
        kp: usize,
        nr: usize,
        qs: Vec<i8>,
        dw: Vec<f32>,
        corr: Vec<i32>,
    }

    impl WeightTile {
        pub(super) fn new(kp: usize) -> Self {
            let steps = kp / 64;
            WeightTile {
                kp,
                nr: 0,
                qs: vec![0; NR * kp],
                dw: vec![0.0; NR * steps * 16],
                corr: vec![0; NR * steps * 16],
            }
        }

        /// Unpacks `nr` rows of `kb` q8_0 blocks.
        pub(super) fn load(&mut self, w: &[u8], nr: usize, kb: usize) {
            let (kp, steps) = (self.kp, self.kp / 64);
            self.nr = nr;
            self.qs.fill(0);
            self.dw.fill(0.0);
            for j in 0..nr {
                for b in 0..kb {
                    let blk = &w[(j * kb + b) * BLOCK_BYTES..(j * kb + b + 1) * BLOCK_BYTES];
                    let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for (q, &v) in self.qs[j * kp + b * QK..j * kp + (b + 1) * QK]
                        .iter_mut()
                        .zip(&blk[2..])
                    {
                        *q = v as i8;
                    }
                    let lanes = (j * steps + b / 2) * 16 + (b % 2) * 8;
                    self.dw[lanes..lanes + 8].fill(d);
                }
                for s in 0..steps {
                    for l in 0..16 {
                        let g = &self.qs[j * kp + s * 64 + 4 * l..j * kp + s * 64 + 4 * l + 4];
                        let sum: i32 = g.iter().map(|&v| v as i32).sum();
                        self.corr[(j * steps + s) * 16 + l] = -128 * sum;
                    }
                }
            }
        }
    }

    /// Columns [c0, c0 + tile.nr) of y (m, n) from the tile and every row of x.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; `y` points to m * n f32 that no other thread writes in these
    /// columns; `xu` holds m rows of `kp` bytes and `d` m rows of `kp / 32` scales.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_rows(
        tile: &WeightTile,
        xu: &[u8],
        d: &[f32],
        m: usize,
        kp: usize,
        y: *mut f32,
        n: usize,
        c0: usize,
    ) {
        let mut r0 = 0;
        while r0 < m {
            let left = m - r0;
            match (left.min(MR), tile.nr) {
                (4, 4) => tile_kernel::<4, 4>(tile, xu, d, r0, kp, y, n, c0),
                (mr, nr) => {
                    // Edges: one row of x at a time against the tile's rows.
                    for r in r0..r0 + mr {
                        match nr {
                            4 => tile_kernel::<1, 4>(tile, xu, d, r, kp, y, n, c0),
                            3 => tile_kernel::<1, 3>(tile, xu, d, r, kp, y, n, c0),
                            2 => tile_kernel::<1, 2>(tile, xu, d, r, kp, y, n, c0),
                            _ => tile_kernel::<1, 1>(tile, xu, d, r, kp, y, n, c0),
                        }
                    }
                }
            }
            r0 += left.min(MR);
        }
    }

    /// M rows of x from r0 against the tile's first N rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_kernel<const M: usize, const N: usize>(
        tile: &WeightTile,
        xu: &[u8],
        d: &[f32],
        r0: usize,
        kp: usize,
        y: *mut f32,
        n: usize,
        c0: usize,
    ) {
        let steps = kp / 64;
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let xp = xu.as_ptr();
        let dp = d.as_ptr();
        let wq = tile.qs.as_ptr();
        let wd = tile.dw.as_ptr();
        let wc = tile.corr.as_ptr();
        for s in 0..steps {
            let mut xv = [_mm512_setzero_si512(); M];
            let mut dx = [_mm512_setzero_ps(); M];
            for r in 0..M {
                xv[r] = _mm512_loadu_si512(xp.add((r0 + r) * kp + s * 64) as *const _);
                // The two blocks' scales of this row, 8 lanes each.
                let pair = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(
                    dp.add((r0 + r) * (kp / QK) + 2 * s) as *const f64,
                )));
                dx[r] = _mm512_permutexvar_ps(spread, pair);
            }
            for j in 0..N {
                let wv = _mm512_loadu_si512(wq.add(j * kp + s * 64) as *const _);
                let c = _mm512_loadu_si512(wc.add((j * steps + s) * 16) as *const _);
                let dw = _mm512_loadu_ps(wd.add((j * steps + s) * 16));
                for r in 0..M {
                    // Σ (x + 128) w − 128 Σ w = Σ x w, per lane of 4 bytes.
                    let dot = _mm512_dpbusd_epi32(c, xv[r], wv);
                    let sc = _mm512_mul_ps(dw, dx[r]);
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[r][j]);
                }
            }
        }
        for r in 0..M {
            for j in 0..N {
                *y.add((r0 + r) * n + c0 + j) = _mm512_reduce_add_ps(acc[r][j]);
            }
        }
    }
}
