//! A CPU kernel for attention of a few new queries against a long KV cache (decode).
//!
//! At decode time the work is a matrix-vector product per head against every cached key: memory
//! bound. Through candle's GEMM it reached ~6x below memory bandwidth at 8K tokens (a 3-row GEMM
//! against a strided K^T), so this kernel reads each K/V row once for all the query heads of its
//! group, splits the keys into blocks processed in parallel with a per-block softmax (max, sum,
//! weighted values), and merges the blocks exactly as split-K "flash decoding" does
//! (Dao et al., 2023). Inference only: it records no backward (the eager path is for training).
//!
//! The cache may hold f16 keys and values (`--kv f16`, issue 20): rows are then widened to f32 in
//! registers as they are read, so the cache is read at half the bytes while scores, softmax and
//! sums stay f32. The instruction set (scalar, AVX2 + F16C, AVX-512F) is chosen at run time.
//!
//! Within a block the **group kernel** (issue 20) widens each K and V row once, into registers,
//! and uses it for all g query heads of the group, keeping the sums in registers across rows: the
//! scores as a tile of heads x keys (8 keys at a time on AVX-512) whose lane sums end in one
//! transposed reduction per four keys, the values as a tile of heads x columns. The same
//! register tiling as a GEMM micro-kernel (Goto & van de Geijn, 2008), here with a row count of g
//! (GQA's query heads per KV head) instead of a batch. The **per-row kernel** it replaced
//! (one `dot` and one `axpy` per key and head: each f16 row widened g times, a horizontal sum per
//! score, the g output rows loaded and stored per value row) is kept as the reference
//! ([`decode_attention_reference_on`], or `RECURFORMER_ROW_DECODE_ATTENTION=1` for the model),
//! and still runs head sizes that are not a multiple of the lanes (4, 8 or 16).
//!
//! Tested against the eager path and f16 against f32 in `tests/tiny_models.rs` and
//! `tests/kv_cache.rs`; the group kernel against the per-row kernel in `tests/decode_kernel.rs`.

use super::simd::{exp_shift_sum, row_max, Isa, KvElem, Lanes, RowOps, Scalar};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Keys per parallel block.
pub const BLOCK: usize = 512;

/// Which decode kernel runs, on which instruction set, with how many keys per parallel block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeKernel {
    /// One of `Isa::available()`.
    pub isa: Isa,
    /// Keys per parallel block (> 0).
    pub block: usize,
    /// The per-row kernel (the reference, before issue 20's group kernel) instead of the group
    /// kernel.
    pub rows: bool,
}

impl Default for DecodeKernel {
    /// The detected set, [`BLOCK`] keys, the group kernel unless `RECURFORMER_ROW_DECODE_ATTENTION`
    /// is set ([`super::row_decode_attention`]).
    fn default() -> Self {
        DecodeKernel {
            isa: Isa::detect(),
            block: BLOCK,
            rows: super::row_decode_attention(),
        }
    }
}

struct DecodeAttention {
    scale: f32,
    kernel: DecodeKernel,
}

/// Strided view of a rank-4 tensor whose last dimension is contiguous.
pub(crate) struct View<'a, E> {
    pub(crate) data: &'a [E],
    pub(crate) start: usize,
    pub(crate) stride: [usize; 3],
}

impl<E> View<'_, E> {
    #[inline(always)]
    pub(crate) fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &[E] {
        let o = self.start + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[o..o + len]
    }
}

pub(crate) fn view<'a, E: KvElem>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<View<'a, E>> {
    let Some(data) = E::slice(s) else {
        candle_core::bail!(
            "{op}: {what} is {:?}, expected {}",
            s.dtype(),
            std::any::type_name::<E>()
        );
    };
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!(
            "{op}: {what} needs rank 4 with a contiguous last dim, got strides {st:?}"
        );
    }
    Ok(View {
        data,
        start: l.start_offset(),
        stride: [st[0], st[1], st[2]],
    })
}

/// (running max, sum of exp, unnormalised output) of one key block for the g heads of a group.
type Partial = (Vec<f32>, Vec<f32>, Vec<f32>);

struct BlockJob<'a, E> {
    q: &'a View<'a, f32>,
    k: &'a View<'a, E>,
    v: &'a View<'a, E>,
    g: usize,
    hd: usize,
    offset: usize,
    scale: f32,
    block: usize,
    /// Run the per-row kernel (the reference) instead of the group kernel.
    rows: bool,
}

impl<E: KvElem> BlockJob<'_, E>
where
    Scalar: RowOps<E> + Lanes<E>,
{
    /// The block's work compiled for AVX2 + FMA + F16C (8 lanes); the default x86-64 target only
    /// allows SSE2, which made this kernel compute-bound.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, task: Task) -> Partial
    where
        super::simd::Avx2: RowOps<E> + Lanes<E>,
    {
        if self.rows {
            self.run_rows::<super::simd::Avx2>(task)
        } else {
            self.run_group::<super::simd::Avx2>(task)
        }
    }

    /// The same for AVX-512F (16 lanes); a head size that is a multiple of 8 but not of 16 runs
    /// the group kernel on AVX2's 8-lane registers (this CPU has them too). With AVX-512VL the
    /// 256-bit lane sums may use all 32 registers (without it the tiles spilled).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn run_avx512(&self, task: Task) -> Partial
    where
        super::simd::Avx512: RowOps<E> + Lanes<E>,
        super::simd::Avx2: RowOps<E> + Lanes<E>,
    {
        if self.rows {
            self.run_rows::<super::simd::Avx512>(task)
        } else if self.hd.is_multiple_of(16) {
            self.run_group::<super::simd::Avx512>(task)
        } else {
            self.run_group::<super::simd::Avx2>(task)
        }
    }

    /// Keys lo..hi of the block `blk` that query `i` sees (empty when the block is past them).
    fn keys(&self, i: usize, blk: usize) -> (usize, usize) {
        let visible = self.offset + i + 1; // keys 0..visible are causal for this query
        let lo = blk * self.block;
        (lo, ((blk + 1) * self.block).min(visible))
    }

    /// The per-row kernel: one `dot` per (key, query head) and one `axpy` per (value, query
    /// head), each ending in its own horizontal sum or accumulator round trip through memory.
    /// Kept as the reference the group kernel is tested and timed against, and for head sizes
    /// the group kernel does not take (not a multiple of the register's lanes).
    #[inline(always)]
    fn run_rows<O: RowOps<E>>(&self, (bi, kh, i, blk): Task) -> Partial {
        let (q, k, v, g, hd) = (self.q, self.k, self.v, self.g, self.hd);
        let (lo, hi) = self.keys(i, blk);
        let mut m = vec![f32::NEG_INFINITY; g];
        let mut l = vec![0f32; g];
        let mut acc = vec![0f32; g * hd];
        if lo >= hi {
            return (m, l, acc);
        }
        let n = hi - lo;
        let qrows: Vec<&[f32]> = (0..g).map(|gi| q.row(bi, kh * g + gi, i, hd)).collect();
        let mut scores = vec![0f32; g * n];
        // Each key row is read once for the g query heads of its group (f16 rows are widened to
        // f32 in registers by `O::dot`, once per head).
        for j in lo..hi {
            let kr = k.row(bi, kh, j, hd);
            for gi in 0..g {
                scores[gi * n + (j - lo)] = O::dot(qrows[gi], kr) * self.scale;
            }
        }
        for gi in 0..g {
            let row = &mut scores[gi * n..(gi + 1) * n];
            let mx = row_max(row, f32::NEG_INFINITY);
            m[gi] = mx;
            l[gi] = exp_shift_sum(row, mx);
        }
        for j in lo..hi {
            let vr = v.row(bi, kh, j, hd);
            for gi in 0..g {
                let p = scores[gi * n + (j - lo)];
                O::axpy(&mut acc[gi * hd..(gi + 1) * hd], p, vr);
            }
        }
        (m, l, acc)
    }

    /// The group kernel: each K and V row is widened to f32 once, into registers, and used for
    /// every query head of the group; the sums live in registers across rows (a tile of
    /// heads x keys for the scores, heads x columns for the values), and the scores of a batch of
    /// keys end in one transposed horizontal reduction. Heads are taken four at a time, so that a
    /// tile fits the register file; the softmax and the block merge are the per-row kernel's.
    #[inline(always)]
    fn run_group<O: Lanes<E> + RowOps<E>>(&self, task: Task) -> Partial {
        let (bi, kh, i, blk) = task;
        let (q, k, v, g, hd) = (self.q, self.k, self.v, self.g, self.hd);
        if !hd.is_multiple_of(O::N) {
            return self.run_rows::<O>(task);
        }
        let (lo, hi) = self.keys(i, blk);
        let mut m = vec![f32::NEG_INFINITY; g];
        let mut l = vec![0f32; g];
        let mut acc = vec![0f32; g * hd];
        if lo >= hi {
            return (m, l, acc);
        }
        let n = hi - lo;
        // The group's queries, scaled once instead of every score: (g, hd).
        let mut qs = vec![0f32; g * hd];
        for gi in 0..g {
            let row = q.row(bi, kh * g + gi, i, hd);
            for (x, &y) in qs[gi * hd..(gi + 1) * hd].iter_mut().zip(row) {
                *x = y * self.scale;
            }
        }
        // Rows lo..hi of this KV head lie at a fixed stride from row lo; slicing the last one
        // checks that all of them are in bounds.
        let (kp, vp) = (
            k.row(bi, kh, lo, hd).as_ptr(),
            v.row(bi, kh, lo, hd).as_ptr(),
        );
        let _ = (k.row(bi, kh, hi - 1, hd), v.row(bi, kh, hi - 1, hd));
        let rows = Rows {
            k: kp,
            v: vp,
            ks: k.stride[2],
            vs: v.stride[2],
            n,
            hd,
        };
        let mut scores = vec![0f32; g * n]; // (g, n)
        let mut h0 = 0;
        while h0 < g {
            let gc = (g - h0).min(4);
            let (qh, sh) = (qs[h0 * hd..].as_ptr(), scores[h0 * n..].as_mut_ptr());
            // SAFETY: rows 0..n of `rows` are in bounds (checked above); `qh` holds gc rows of hd
            // and `sh` gc rows of n.
            unsafe {
                match gc {
                    1 => group_scores::<E, O, 1>(&rows, qh, sh),
                    2 => group_scores::<E, O, 2>(&rows, qh, sh),
                    3 => group_scores::<E, O, 3>(&rows, qh, sh),
                    _ => group_scores::<E, O, 4>(&rows, qh, sh),
                }
            }
            h0 += gc;
        }
        for gi in 0..g {
            let row = &mut scores[gi * n..(gi + 1) * n];
            let mx = row_max(row, f32::NEG_INFINITY);
            m[gi] = mx;
            l[gi] = exp_shift_sum(row, mx);
        }
        let mut h0 = 0;
        while h0 < g {
            let gc = (g - h0).min(4);
            let (ph, ah) = (scores[h0 * n..].as_ptr(), acc[h0 * hd..].as_mut_ptr());
            // SAFETY: as above; `ph` holds gc rows of n and `ah` gc rows of hd.
            unsafe {
                match gc {
                    1 => group_values::<E, O, 1>(&rows, ph, ah),
                    2 => group_values::<E, O, 2>(&rows, ph, ah),
                    3 => group_values::<E, O, 3>(&rows, ph, ah),
                    _ => group_values::<E, O, 4>(&rows, ph, ah),
                }
            }
            h0 += gc;
        }
        (m, l, acc)
    }
}

/// Registers of a row that [`group_values`] sums in one pass over the block: a G x C tile of
/// sums, G broadcast probabilities and a value register must fit the register file.
const fn value_cols(wide: bool, g: usize) -> usize {
    // 16 registers with G = 3: C = 4 (12 sums) spilled and ran f16 at 0.8x of C = 2.
    if wide || g <= 2 {
        4
    } else {
        2
    }
}

/// (batch, KV head, query position, key block).
type Task = (usize, usize, usize, usize);

/// The n key and value rows of one block: row j at `k + j * ks` (`v + j * vs`), hd elements.
struct Rows<E> {
    k: *const E,
    v: *const E,
    ks: usize,
    vs: usize,
    n: usize,
    hd: usize,
}

/// Scores of G query heads (`q`: G rows of hd, already scaled) against every key of `r`, into
/// `out` (G rows of n). Keys go in batches whose tile of sums (G x batch registers) fits the
/// register file with a key register or two: 8 keys on AVX-512's 32 registers (4 for G = 4), 4
/// on 16 registers (8 for G = 1, 2 for G = 4); the last n % batch keys one at a time.
///
/// # Safety
/// `r`'s rows in bounds, hd a multiple of `O::N`, `q` and `out` valid for G rows.
#[inline(always)]
unsafe fn group_scores<E: KvElem, O: Lanes<E>, const G: usize>(
    r: &Rows<E>,
    q: *const f32,
    out: *mut f32,
) {
    let j = match (O::WIDE, G) {
        (true, 1..=3) => scores::<E, O, G, 8>(r, q, out, 0),
        (true, _) => scores::<E, O, G, 4>(r, q, out, 0),
        (false, 1) => scores::<E, O, G, 8>(r, q, out, 0),
        (false, 2 | 3) => scores::<E, O, G, 4>(r, q, out, 0),
        (false, _) => scores::<E, O, G, 2>(r, q, out, 0),
    };
    scores::<E, O, G, 1>(r, q, out, j);
}

/// Scores of keys j0.. in batches of KB while a whole batch remains; returns the first key left.
// Index loops over the tiles: with G and KB constant they unroll into named registers.
#[allow(clippy::needless_range_loop, clippy::manual_memcpy)]
#[inline(always)]
unsafe fn scores<E: KvElem, O: Lanes<E>, const G: usize, const KB: usize>(
    r: &Rows<E>,
    q: *const f32,
    out: *mut f32,
    j0: usize,
) -> usize {
    let (n, hd) = (r.n, r.hd);
    // When the value pass will go over the block in several column slices, each slice reads
    // every row at a stride, which streamed badly from memory (AVX2 with G = 3: f16 at 0.7x):
    // ask for each value row while its key row is read instead, so that the block's values
    // arrive in row order and the slices find them in cache. A single slice reads rows in
    // order already (there the prefetches cost 5-15 %).
    let pfv = hd / O::N > value_cols(O::WIDE, G);
    let mut j = j0;
    while j + KB <= n {
        let mut acc = [[O::zero(); KB]; G];
        // Key by key, each row from start to end: read in this order the rows stream from
        // memory; column-major over the batch (all keys' first register, then the second, ...)
        // ran the f32 cache at 0.6x the bandwidth (the hardware prefetchers see a scattered
        // pattern). The queries come from L1 each time (a memory operand of the FMA).
        for b in 0..KB {
            let row = r.k.add((j + b) * r.ks);
            if pfv {
                super::simd::prefetch_row(r.v.add((j + b) * r.vs), hd);
            }
            let mut d = 0;
            while d < hd {
                // One key register, widened once, for all G heads.
                let kv = O::load_kv(row.add(d));
                for h in 0..G {
                    acc[h][b] = O::fma(O::load(q.add(h * hd + d)), kv, acc[h][b]);
                }
                d += O::N;
            }
        }
        // Lane sums four keys at a time: one transposed reduction per four scores.
        for h in 0..G {
            let mut b = 0;
            while b < KB {
                let w = (KB - b).min(4);
                let mut four = [O::zero(); 4];
                for x in 0..w {
                    four[x] = acc[h][b + x];
                }
                let s = O::hsum4(four);
                for x in 0..w {
                    *out.add(h * n + j + b + x) = s[x];
                }
                b += 4;
            }
        }
        j += KB;
    }
    j
}

/// acc (G rows of hd) = Σ_j p[h, j] v_j for G heads (`p`: G rows of n). The columns go in
/// slices of C registers, each slice summed over all n rows in a G x C tile of registers (4
/// registers a slice; 2 for G >= 3 on 16 registers), the rest of the columns one register at a
/// time.
///
/// # Safety
/// As [`group_scores`], with `p` and `acc` valid for G rows.
#[inline(always)]
unsafe fn group_values<E: KvElem, O: Lanes<E>, const G: usize>(
    r: &Rows<E>,
    p: *const f32,
    acc: *mut f32,
) {
    let nv = r.hd / O::N; // registers per row
    let mut c0 = 0;
    if value_cols(O::WIDE, G) == 4 {
        while c0 + 4 <= nv {
            values::<E, O, G, 4>(r, p, acc, c0 * O::N);
            c0 += 4;
        }
    } else {
        while c0 + 2 <= nv {
            values::<E, O, G, 2>(r, p, acc, c0 * O::N);
            c0 += 2;
        }
    }
    while c0 < nv {
        values::<E, O, G, 1>(r, p, acc, c0 * O::N);
        c0 += 1;
    }
}

/// Columns d0..d0 + C * N of [`group_values`].
#[allow(clippy::needless_range_loop)] // as in `scores`
#[inline(always)]
unsafe fn values<E: KvElem, O: Lanes<E>, const G: usize, const C: usize>(
    r: &Rows<E>,
    p: *const f32,
    out: *mut f32,
    d0: usize,
) {
    let (n, hd) = (r.n, r.hd);
    let mut acc = [[O::zero(); C]; G];
    for j in 0..n {
        let row = r.v.add(j * r.vs + d0);
        let mut pv = [O::zero(); G];
        for h in 0..G {
            pv[h] = O::splat(*p.add(h * n + j));
        }
        for c in 0..C {
            // One value register, widened once, for all G heads.
            let x = O::load_kv(row.add(c * O::N));
            for h in 0..G {
                acc[h][c] = O::fma(pv[h], x, acc[h][c]);
            }
        }
    }
    for h in 0..G {
        for c in 0..C {
            O::store(out.add(h * hd + d0 + c * O::N), acc[h][c]);
        }
    }
}

impl DecodeAttention {
    fn forward<E: KvElem>(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)>
    where
        Scalar: RowOps<E> + Lanes<E>,
        super::simd::Avx2: RowOps<E> + Lanes<E>,
        super::simd::Avx512: RowOps<E> + Lanes<E>,
    {
        const OP: &str = "decode attention";
        let (b, nh, t, hd) = ql.shape().dims4()?;
        let (_, nkv, s, _) = kl.shape().dims4()?;
        let g = nh / nkv;
        let offset = s - t;
        let (q, k, v) = (
            view::<f32>(qs, ql, OP, "q")?,
            view::<E>(ks, kl, OP, "k")?,
            view::<E>(vs, vl, OP, "v")?,
        );
        let block = self.kernel.block;
        let nblocks = s.div_ceil(block);
        // One task per (batch, KV head, query position, key block); each returns, for the g query
        // heads of the group, the block's running max, sum of exp, and unnormalised output.
        let tasks: Vec<(usize, usize, usize, usize)> = (0..b)
            .flat_map(|bi| {
                (0..nkv).flat_map(move |kh| {
                    (0..t).flat_map(move |i| (0..nblocks).map(move |blk| (bi, kh, i, blk)))
                })
            })
            .collect();
        let job = BlockJob {
            q: &q,
            k: &k,
            v: &v,
            g,
            hd,
            offset,
            scale: self.scale,
            block,
            rows: self.kernel.rows,
        };
        let isa = self.kernel.isa;
        let partial: Vec<Partial> = tasks
            .par_iter()
            .map(|&task| match isa {
                // SAFETY: `isa` is one the CPU supports (`Isa::detect` / `Isa::available`).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { job.run_avx512(task) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { job.run_avx2(task) },
                _ if job.rows => job.run_rows::<Scalar>(task),
                _ => job.run_group::<Scalar>(task),
            })
            .collect();
        // Merge the blocks: rescale each block's sums by exp(m_block - m_total).
        let mut out = vec![0f32; b * nh * t * hd];
        for bi in 0..b {
            for kh in 0..nkv {
                for i in 0..t {
                    let base = ((bi * nkv + kh) * t + i) * nblocks;
                    for gi in 0..g {
                        let mt = (0..nblocks)
                            .map(|blk| partial[base + blk].0[gi])
                            .fold(f32::NEG_INFINITY, f32::max);
                        let h = kh * g + gi;
                        let o = &mut out
                            [((bi * nh + h) * t + i) * hd..((bi * nh + h) * t + i + 1) * hd];
                        let mut denom = 0f32;
                        for blk in 0..nblocks {
                            let (m, l, acc) = &partial[base + blk];
                            if m[gi] == f32::NEG_INFINITY {
                                continue;
                            }
                            let w = (m[gi] - mt).exp();
                            denom += l[gi] * w;
                            for (x, y) in o.iter_mut().zip(&acc[gi * hd..(gi + 1) * hd]) {
                                *x += w * y;
                            }
                        }
                        o.iter_mut().for_each(|x| *x /= denom);
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, nh, t, hd))))
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (ks.dtype(), vs.dtype()) {
            (DType::F32, DType::F32) => self.forward::<f32>(qs, ql, ks, kl, vs, vl),
            (DType::F16, DType::F16) => self.forward::<f16>(qs, ql, ks, kl, vs, vl),
            (a, b) => candle_core::bail!(
                "decode attention: keys {a:?} and values {b:?}; both f32 or both f16"
            ),
        }
    }
}

/// Causal attention of q (b, nh, t, hd) at positions s-t..s against k, v (b, nkv, s, hd):
/// returns (b, nh, t, hd). k and v may be views into a larger cache (last dim contiguous).
/// k and v are both f32 or both f16 (an f16 cache, widened to f32 in registers); q and the
/// result are f32. Runs the group kernel on the best instruction set of this CPU
/// ([`DecodeKernel::default`]).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    decode_attention_with(DecodeKernel::default(), q, k, v, scale)
}

/// [`decode_attention`]'s group kernel on a given instruction set, which must be one of
/// `Isa::available()` (tests compare the sets).
pub fn decode_attention_on(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let kernel = DecodeKernel {
        isa,
        block: BLOCK,
        rows: false,
    };
    decode_attention_with(kernel, q, k, v, scale)
}

/// The per-row kernel on a given instruction set: the reference the group kernel is tested and
/// timed against.
pub fn decode_attention_reference_on(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let kernel = DecodeKernel {
        isa,
        block: BLOCK,
        rows: true,
    };
    decode_attention_with(kernel, q, k, v, scale)
}

/// [`decode_attention`] with the kernel, instruction set and block size chosen by the caller.
pub fn decode_attention_with(
    kernel: DecodeKernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !Isa::available().contains(&kernel.isa) {
        candle_core::bail!("decode attention: this CPU cannot run {:?}", kernel.isa);
    }
    if kernel.block == 0 {
        candle_core::bail!("decode attention: a block of 0 keys");
    }
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale: scale as f32,
            kernel,
        },
    )
}
