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
//! registers as they are read (`simd::RowOps`), so the cache is read at half the bytes while scores,
//! softmax and sums stay f32. The instruction set (scalar, AVX2 + F16C, AVX-512F) is chosen at run
//! time. Tested against the eager path and f16 against f32 in `tests/tiny_models.rs` and
//! `tests/kv_cache.rs`.

use super::simd::{exp_shift_sum, row_max, Isa, KvElem, RowOps, Scalar};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Keys per parallel block.
const BLOCK: usize = 512;

struct DecodeAttention {
    scale: f32,
    isa: Isa,
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
}

impl<E: KvElem> BlockJob<'_, E>
where
    Scalar: RowOps<E>,
{
    /// The block's work compiled for AVX2 + FMA + F16C (8 lanes); the default x86-64 target only
    /// allows SSE2, which made this kernel compute-bound.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, task: (usize, usize, usize, usize)) -> Partial
    where
        super::simd::Avx2: RowOps<E>,
    {
        self.run::<super::simd::Avx2>(task)
    }

    /// The same for AVX-512F (16 lanes).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn run_avx512(&self, task: (usize, usize, usize, usize)) -> Partial
    where
        super::simd::Avx512: RowOps<E>,
    {
        self.run::<super::simd::Avx512>(task)
    }

    #[inline(always)]
    fn run<O: RowOps<E>>(&self, (bi, kh, i, blk): (usize, usize, usize, usize)) -> Partial {
        let (q, k, v, g, hd) = (self.q, self.k, self.v, self.g, self.hd);
        let visible = self.offset + i + 1; // keys 0..visible are causal for this query
        let lo = blk * BLOCK;
        let hi = ((blk + 1) * BLOCK).min(visible);
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
        // f32 in registers by `O::dot`).
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
        Scalar: RowOps<E>,
        super::simd::Avx2: RowOps<E>,
        super::simd::Avx512: RowOps<E>,
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
        let nblocks = s.div_ceil(BLOCK);
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
        };
        let isa = self.isa;
        let partial: Vec<Partial> = tasks
            .par_iter()
            .map(|&task| match isa {
                // SAFETY: `isa` is one the CPU supports (`Isa::detect` / `Isa::available`).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { job.run_avx512(task) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { job.run_avx2(task) },
                _ => job.run::<Scalar>(task),
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
/// result are f32. Runs on the best instruction set of this CPU ([`Isa::detect`]).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    decode_attention_on(Isa::detect(), q, k, v, scale)
}

/// [`decode_attention`] on a given instruction set, which must be one of `Isa::available()`
/// (tests compare the sets).
pub fn decode_attention_on(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !Isa::available().contains(&isa) {
        candle_core::bail!("decode attention: this CPU cannot run {isa:?}");
    }
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale: scale as f32,
            isa,
        },
    )
}
