//! A CPU kernel for attention of a few new queries against a long KV cache (decode).
//!
//! At decode time the work is a matrix-vector product per head against every cached key: memory
//! bound. Through candle's GEMM it reached ~6x below memory bandwidth at 8K tokens (a 3-row GEMM
//! against a strided K^T), so this kernel reads each K/V row once for all the query heads of its
//! group, splits the keys into blocks processed in parallel with a per-block softmax (max, sum,
//! weighted values), and merges the blocks exactly as split-K "flash decoding" does
//! (Dao et al., 2023). Inference only: it records no backward (the eager path is for training).
//! Tested against the eager path in `tests/tiny_models.rs` and `tests/smollm2.rs`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Keys per parallel block.
const BLOCK: usize = 512;

struct DecodeAttention {
    scale: f32,
}

/// Strided view of a rank-4 tensor whose last dimension is contiguous.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 3],
}

impl View<'_> {
    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &[f32] {
        let o = self.start + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[o..o + len]
    }
}

fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<View<'a>> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("decode attention: {what} must be f32"),
    };
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!(
            "decode attention: {what} needs rank 4 with a contiguous last dim, got strides {st:?}"
        );
    }
    Ok(View {
        data,
        start: l.start_offset(),
        stride: [st[0], st[1], st[2]],
    })
}

/// exp(x) for x <= 0 in straight-line code the compiler vectorises (libm's `expf` does not):
/// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
/// < 2e-7 on that interval), 2^n assembled in the exponent bits. Inputs below -87 give 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln 2 split in a part exact in f32 and the remainder (Cody & Waite), so r stays accurate.
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociating one sum.
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        for l in 0..8 {
            acc[l] += a[i + l] * b[i + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// (running max, sum of exp, unnormalised output) of one key block for the g heads of a group.
type Partial = (Vec<f32>, Vec<f32>, Vec<f32>);

struct BlockJob<'a> {
    q: &'a View<'a>,
    k: &'a View<'a>,
    v: &'a View<'a>,
    g: usize,
    hd: usize,
    offset: usize,
    scale: f32,
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl BlockJob<'_> {
    /// The same code compiled with AVX2 + FMA enabled, so the loops vectorise 8 wide. The
    /// default x86-64 target only allows SSE2, which made this kernel compute-bound.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, task: (usize, usize, usize, usize)) -> Partial {
        self.run(task)
    }

    #[inline(always)]
    fn run(&self, (bi, kh, i, blk): (usize, usize, usize, usize)) -> Partial {
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
        for j in lo..hi {
            let kr = k.row(bi, kh, j, hd);
            for gi in 0..g {
                scores[gi * n + (j - lo)] = dot(qrows[gi], kr) * self.scale;
            }
        }
        for gi in 0..g {
            let row = &mut scores[gi * n..(gi + 1) * n];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = exp_nonpositive(*x - mx);
                sum += *x;
            }
            m[gi] = mx;
            l[gi] = sum;
        }
        for j in lo..hi {
            let vr = v.row(bi, kh, j, hd);
            for gi in 0..g {
                let p = scores[gi * n + (j - lo)];
                let a = &mut acc[gi * hd..(gi + 1) * hd];
                for (x, y) in a.iter_mut().zip(vr) {
                    *x += p * y;
                }
            }
        }
        (m, l, acc)
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
        let (b, nh, t, hd) = ql.shape().dims4()?;
        let (_, nkv, s, _) = kl.shape().dims4()?;
        let g = nh / nkv;
        let offset = s - t;
        let (q, k, v) = (view(qs, ql, "q")?, view(ks, kl, "k")?, view(vs, vl, "v")?);
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
        let avx2 = avx2_available();
        let partial: Vec<Partial> = tasks
            .par_iter()
            .map(|&task| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
                    return unsafe { job.run_avx2(task) };
                }
                let _ = avx2;
                job.run(task)
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

/// Causal attention of q (b, nh, t, hd) at positions s-t..s against k, v (b, nkv, s, hd):
/// returns (b, nh, t, hd). k and v may be views into a larger cache (last dim contiguous).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale: scale as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for i in 0..=100_000 {
            let x = -(i as f32) * 8.7e-4;
            let rel = (exp_nonpositive(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }
}
