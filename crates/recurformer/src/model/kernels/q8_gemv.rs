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
//!
//! On CPUs with AVX-512 VNNI a second, tiled kernel takes the same matrices ([`packed_matmul`],
//! issue 22): the row kernel spends about nine instructions per 32 weights and row of x, so in a
//! batched decode step each extra sequence cost almost a whole single step; the tiled kernel
//! holds a copy of each matrix in 16-row tiles ([`QWeight`]) and multiplies 4 inputs into 16
//! rows' sums per `vpdpbusd`. Same integer block sums, so the same results up to the order of
//! the f32 sums (BENCHMARKS.md, "Batched decode after the tiled q8_0 kernel").

use crate::model::kernels::simd::Isa;
use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
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

/// Whether the tiled kernel ([`packed_matmul`]) is switched off in favour of the row kernel:
/// set `RECURFORMER_ROW_Q8_GEMV=1` to time or check the path before it. Read once, when a
/// matrix is quantised.
/// Whether matrices quantised from now on get the tiled copy of [`QWeight`]. Off by default: the
/// copy holds every q8_0 block a second time (about 135 MiB for SmolLM2-135M) and pays only when
/// several sequences decode in one step, so `serve --parallel N` (N > 1) turns it on before
/// loading; one-sequence decode (`generate`, `bench`, `eval`) keeps one copy of the weights and
/// the row kernel (issue 20's memory target, issue 22's batched decode).
static TILED_PACKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the tiled copy of matrices quantised later on or off (see [`TILED_PACKING`]).
pub fn set_tiled_packing(on: bool) {
    TILED_PACKING.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn tiled_packing() -> bool {
    TILED_PACKING.load(std::sync::atomic::Ordering::Relaxed)
}

fn tiled_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("RECURFORMER_ROW_Q8_GEMV").is_ok_and(|v| !v.is_empty() && v != "0")
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

/// A quantised weight matrix as inference runs it: candle's `QMatMul`, and for a q8_0 matrix on
/// a CPU with AVX-512 VNNI that candle does not repack, a copy of its blocks in 16-row tiles for
/// [`packed_matmul`] (issue 22: the batched decode step).
#[derive(Debug, Clone)]
pub struct QWeight {
    pub q: QMatMul,
    packed: Option<std::sync::Arc<PackedQ8_0>>,
}

impl QWeight {
    /// Wraps a quantised matrix, packing its tiles when the tiled kernel will take it and tiled
    /// packing is on ([`set_tiled_packing`]).
    pub fn new(t: QTensor) -> Result<Self> {
        let q = QMatMul::from_arc(std::sync::Arc::new(t))?;
        let packed = match &q {
            QMatMul::QTensor(w) if tiled_packing() && vnni() && !disabled() && !tiled_off() => {
                PackedQ8_0::pack(w)?
            }
            _ => None,
        }
        .map(std::sync::Arc::new);
        Ok(QWeight { q, packed })
    }

    /// Bytes of the tiled copy (0 when there is none).
    pub fn packed_bytes(&self) -> usize {
        self.packed
            .as_ref()
            .map_or(0, |p| p.tiles.len() * std::mem::size_of::<Tile>())
    }
}

/// `x Wᵀ` through `w`: x (m, k) -> (m, n), with the tiled kernel when `w` has tiles and m is at
/// most [`MAX_ROWS`], else as [`qmatmul_q`].
pub fn qmatmul(w: &QWeight, x: &Tensor) -> Result<Tensor> {
    if let Some(p) = &w.packed {
        if let Some(y) = packed_matmul(p, x)? {
            return Ok(y);
        }
    }
    qmatmul_q(&w.q, x)
}

/// `x Wᵀ` through `q`: x (m, k) -> (m, n), with the row kernel here when it applies (q8_0
/// weights, f32 x on the CPU, 1..=MAX_ROWS rows, a matrix candle does not repack), the prefill
/// GEMM of `q8_gemm` for more rows of such a matrix, and candle's quantised matmul otherwise.
pub fn qmatmul_q(q: &QMatMul, x: &Tensor) -> Result<Tensor> {
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

/// The operands the q8_0 kernels here read for `x Wᵀ` (this file's row kernel and
/// `q8_gemm`'s prefill GEMM): W's blocks, checked against its shape, and x (m, k) quantised to
/// q8_0 rows. None when the product is not theirs: W not q8_0, x not f32 on the CPU or not 2-D, k
/// not whole blocks, or `takes(m, k)` false; an error (`what` names the kernel) when x and W
/// disagree.
pub(crate) struct Q8Operands<'a> {
    pub data: std::borrow::Cow<'a, [u8]>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub xq: QuantRows,
}

pub(crate) fn q8_0_operands<'a>(
    q: &'a QMatMul,
    x: &Tensor,
    takes: impl Fn(usize, usize) -> bool,
    what: &str,
) -> Result<Option<Q8Operands<'a>>> {
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
    if k % QK != 0 || !takes(m, k) {
        return Ok(None);
    }
    if wk != k {
        anyhow::bail!("{what}: input has {k} columns, the weight matrix is ({n}, {wk})");
    }
    let data = q8_0_blocks(w, n, k, what)?;
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let xq = quantize_rows(&xs, m, k);
    Ok(Some(Q8Operands { data, m, n, k, xq }))
}

/// The q8_0 blocks of `w` (n, k), refused when their length does not match the shape.
fn q8_0_blocks<'a>(
    w: &'a QTensor,
    n: usize,
    k: usize,
    what: &str,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let data = w.data()?;
    let want = n * (k / QK) * BLOCK_BYTES;
    if data.len() != want {
        anyhow::bail!(
            "{what}: weight storage holds {} bytes, expected {want} for ({n}, {k})",
            data.len()
        );
    }
    Ok(data)
}

/// The kernel on the instruction set `isa`: None when it does not apply (see [`qmatmul`]).
pub fn q8_0_matmul_on(isa: Isa, q: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let Some(Q8Operands { data, m, n, k, xq }) =
        q8_0_operands(q, x, |m, _| m >= 1 && m <= MAX_ROWS, "q8_0 matmul")?
    else {
        return Ok(None);
    };
    let kb = k / QK;
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

/// Whether the tiled kernel can run here: AVX-512 F, BW and VNNI (`vpdpbusd`), and the kernels'
/// instruction set not capped below AVX-512 (`RECURFORMER_ISA`). Read once.
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            Isa::detect() == Isa::Avx512
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output rows per tile: one 512-bit register of f32 sums.
const TILE_N: usize = 16;

/// One block of 32 inputs for 16 output rows of a q8_0 matrix, laid out for `vpdpbusd`: each
/// 64-byte group of `qs` holds 4 consecutive weights of each of the 16 rows, so one instruction
/// multiplies 4 inputs (broadcast) into all 16 rows' sums.
#[repr(C, align(64))]
#[derive(Clone)]
struct Tile {
    /// [group of 4 inputs (8)][row (16)][4]: the weights as stored (signed).
    qs: [i8; QK * TILE_N],
    /// Each row's block scale (the f16 of the file, widened).
    d: [f32; TILE_N],
    /// 128 × the sum of each row's 32 weights: `vpdpbusd` multiplies unsigned by signed bytes,
    /// so x goes in offset by +128 and this term comes off the integer sum, which is then
    /// exactly GGML's.
    wsum128: [i32; TILE_N],
}

/// A q8_0 matrix (n, k) in [`Tile`]s: `tiles[t * kb + b]` holds rows 16t..16t+16, block b. The
/// last n % 16 rows are not tiled; the row kernel does them from the original blocks.
#[derive(Clone)]
pub struct PackedQ8_0 {
    n: usize,
    k: usize,
    tiles: Vec<Tile>,
    /// The original blocks of the untiled last rows.
    tail: Vec<u8>,
}

impl std::fmt::Debug for PackedQ8_0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ8_0({}, {})", self.n, self.k)
    }
}

impl PackedQ8_0 {
    /// The tiles of `w`; None for a matrix the tiled kernel does not take (not q8_0, not 2-D,
    /// fewer than 16 rows, inputs not a multiple of 32, or one that candle repacks itself).
    pub fn pack(w: &QTensor) -> Result<Option<Self>> {
        let Ok((n, k)) = w.shape().dims2() else {
            return Ok(None);
        };
        if w.dtype() != GgmlDType::Q8_0 || n < TILE_N || k % QK != 0 || candle_repacks(k) {
            return Ok(None);
        }
        let data = q8_0_blocks(w, n, k, "q8_0 tiles")?;
        let kb = k / QK;
        let nt = n / TILE_N;
        let mut tiles = Vec::with_capacity(nt * kb);
        for t in 0..nt {
            for b in 0..kb {
                let mut tile = Tile {
                    qs: [0; QK * TILE_N],
                    d: [0.0; TILE_N],
                    wsum128: [0; TILE_N],
                };
                for r in 0..TILE_N {
                    let off = ((t * TILE_N + r) * kb + b) * BLOCK_BYTES;
                    let blk = &data[off..off + BLOCK_BYTES];
                    tile.d[r] = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let mut sum = 0i32;
                    for (i, &v) in blk[2..].iter().enumerate() {
                        let v = v as i8;
                        tile.qs[((i / 4) * TILE_N + r) * 4 + i % 4] = v;
                        sum += v as i32;
                    }
                    tile.wsum128[r] = 128 * sum;
                }
                tiles.push(tile);
            }
        }
        let tail = data[nt * TILE_N * kb * BLOCK_BYTES..].to_vec();
        Ok(Some(PackedQ8_0 { n, k, tiles, tail }))
    }
}

/// `x Wᵀ` for 1..=[`MAX_ROWS`] f32 rows of x on the CPU against a tiled q8_0 matrix: the same
/// arithmetic as the row kernel (x rounded per block of 32 as GGML's Q8_0, exact integer block
/// sums, each scaled by both blocks' scales and summed in f32), with each 16 × 32 tile of
/// weights read once per call and multiplied into 16 rows' sums by one `vpdpbusd` per 4 inputs
/// and row of x. None when it does not apply (other shapes, dtypes or devices; more rows).
pub fn packed_matmul(p: &PackedQ8_0, x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || !vnni() {
        return Ok(None);
    }
    let Ok((m, k)) = x.dims2() else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS {
        return Ok(None);
    }
    if k != p.k {
        anyhow::bail!(
            "q8_0 matmul: input has {k} columns, the weight matrix is ({}, {})",
            p.n,
            p.k
        );
    }
    let n = p.n;
    let kb = k / QK;
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let xq = quantize_rows(&xs, m, k);
    // x + 128 as unsigned bytes: the operand `vpdpbusd` takes unsigned.
    let xu: Vec<u8> = xq.qs.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let mut y = vec![0f32; m * n];
    let nt = n / TILE_N;
    #[cfg(target_arch = "x86_64")]
    {
        let y_ptr = y.as_mut_ptr() as usize;
        let run = |range: std::ops::Range<usize>| {
            for t in range {
                let tiles = &p.tiles[t * kb..(t + 1) * kb];
                // SAFETY: `vnni()` checked the instructions; each tile writes its own 16 columns
                // of `y`, which outlives the call; the row pointers stay inside xu / xq.d / y.
                unsafe {
                    x86::tile_rows(
                        tiles,
                        &xu,
                        &xq.d,
                        m,
                        k,
                        (y_ptr as *mut f32).add(t * TILE_N),
                        n,
                    )
                };
            }
        };
        if n * k >= PARALLEL_MIN_WEIGHTS {
            candle_core::utils::barrier_pool().execute_chunked(nt, run);
        } else {
            run(0..nt);
        }
    }
    let tail_rows = n - nt * TILE_N;
    if tail_rows > 0 {
        let mut yt = vec![0f32; tail_rows * m];
        gemv_rows(Isa::detect(), &p.tail, kb, &xq, m, &mut yt);
        for j in 0..tail_rows {
            for r in 0..m {
                y[r * n + nt * TILE_N + j] = yt[j * m + r];
            }
        }
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
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

    /// One tile row (16 output rows, all `kb` blocks) against M rows of x: `xu` / `xd` point at
    /// the first of the M rows, `out` at its first output of the tile; rows of `out` are `n`
    /// apart.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dots<const M: usize>(
        tiles: &[super::Tile],
        xu: *const u8,
        xd: *const f32,
        k: usize,
        kb: usize,
        out: *mut f32,
        n: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, t) in tiles.iter().enumerate() {
            // Two integer sums per row (even and odd groups) so that one row's `vpdpbusd`s do
            // not wait on each other; both exact, added at the end of the block.
            let mut ia = [_mm512_setzero_si512(); M];
            let mut ib = [_mm512_setzero_si512(); M];
            for g in (0..8).step_by(2) {
                let wa = _mm512_load_si512(t.qs.as_ptr().add(g * 64) as *const _);
                let wb = _mm512_load_si512(t.qs.as_ptr().add((g + 1) * 64) as *const _);
                for r in 0..M {
                    let px = xu.add(r * k + b * QK + g * 4);
                    let xa = _mm512_set1_epi32((px as *const i32).read_unaligned());
                    let xb = _mm512_set1_epi32((px.add(4) as *const i32).read_unaligned());
                    ia[r] = _mm512_dpbusd_epi32(ia[r], xa, wa);
                    ib[r] = _mm512_dpbusd_epi32(ib[r], xb, wb);
                }
            }
            let dw = _mm512_load_ps(t.d.as_ptr());
            let corr = _mm512_load_si512(t.wsum128.as_ptr() as *const _);
            for r in 0..M {
                let isum = _mm512_sub_epi32(_mm512_add_epi32(ia[r], ib[r]), corr);
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(r * kb + b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[r]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * n), *a);
        }
    }

    /// All m rows of x against one tile row, in groups of up to 4 rows (each group's sums stay
    /// in registers; the tile row is read once per group, from cache after the first).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_rows(
        tiles: &[super::Tile],
        xu: &[u8],
        xd: &[f32],
        m: usize,
        k: usize,
        out: *mut f32,
        n: usize,
    ) {
        debug_assert!(xu.len() >= m * k && xd.len() >= m * (k / QK));
        let kb = k / QK;
        let mut r0 = 0;
        while r0 < m {
            let left = m - r0;
            let (pu, pd, po) = (
                xu.as_ptr().add(r0 * k),
                xd.as_ptr().add(r0 * kb),
                out.add(r0 * n),
            );
            match left {
                1 => tile_dots::<1>(tiles, pu, pd, k, kb, po, n),
                2 => tile_dots::<2>(tiles, pu, pd, k, kb, po, n),
                3 => tile_dots::<3>(tiles, pu, pd, k, kb, po, n),
                _ => tile_dots::<4>(tiles, pu, pd, k, kb, po, n),
            }
            r0 += left.min(4);
        }
    }
}
