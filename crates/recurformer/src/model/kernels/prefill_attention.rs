//! Tiled attention for prefill: many new queries against the cache, without ever forming the
//! (queries x keys) score matrix (issue 20, part 3).
//!
//! The chunked path it replaces computed a score block of up to 64 MB with candle's GEMM, added a
//! mask, ran a softmax and a second GEMM, each pass writing and reading the whole block from
//! memory, and spent half the block's work on masked keys. Here a task owns a tile of query rows
//! (the g query heads of one KV group at up to 64/g consecutive positions, so every key row loaded
//! serves the whole group) and walks the keys it may see in tiles of 64, keeping per row the
//! running max m, the running sum l of exp(s - m) and the unnormalised output o, rescaled by
//! exp(m_old - m_new) whenever the max grows: the online softmax of FlashAttention (Dao et al.
//! 2022, arXiv:2205.14135, Algorithm 1; Milakov & Gimelshein 2018, arXiv:1805.02867). Score and
//! probability tiles (64 x 64 floats) live in L1/L2; key tiles entirely in a query tile's future, or
//! outside its window, are never visited; only tiles crossing the diagonal or a window edge are
//! masked.
//!
//! Keys and values may be f32 or f16 (an f16 cache): each key / value tile is widened to f32 once
//! into scratch as it is loaded, then two register-blocked microkernels (4 rows x 16 lanes)
//! compute S = Q K^T and O += P V. The same kernel serves the windowed heads (`model::window`):
//! with `window` set a query at position p sees keys j <= p with j < sinks or p - j < window, in
//! the cache layout of `WindowKv` (sink rows, then contiguous positions). Inference only (no
//! backward). Tested against the eager paths in the unit tests below and in `tests/kv_cache.rs`.
//!
//! Glossary: b batch, nh query heads, nkv KV heads, g = nh / nkv, t new queries, s key rows, hd
//! head dim; a "row" of a query tile is one (position, head) pair.

use super::decode_attention::{view, View};
use super::simd::{exp_nonpositive, exp_shift_sum, row_max, Isa, KvElem, RowOps, Scalar};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Which keys a query sees, and where key positions sit in the key tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyRule {
    /// `Some((sinks, window))`: only keys j < sinks or p - j < window (and j <= p); `None`: every
    /// key j <= p (causal).
    pub window: Option<(usize, usize)>,
    /// Rows `0..sink_rows` hold positions `0..sink_rows`; the rows after them hold the contiguous
    /// positions `first_pos..`. A full cache is `sink_rows = first_pos = 0`.
    pub sink_rows: usize,
    pub first_pos: usize,
}

impl KeyRule {
    #[inline(always)]
    fn visible(&self, p: usize, j: usize) -> bool {
        j <= p
            && match self.window {
                None => true,
                Some((sinks, w)) => j < sinks || p - j < w,
            }
    }
    #[inline(always)]
    fn row_of(&self, pos: usize) -> usize {
        if pos < self.sink_rows {
            pos
        } else {
            self.sink_rows + (pos - self.first_pos)
        }
    }
    #[inline(always)]
    fn pos_of(&self, row: usize) -> usize {
        if row < self.sink_rows {
            row
        } else {
            self.first_pos + (row - self.sink_rows)
        }
    }

    /// Key row ranges [lo, hi) that queries at positions p0..p1 may see, ascending and disjoint
    /// (the same cut as `window::windowed_attention`'s query blocks).
    fn ranges(&self, p0: usize, p1: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(3);
        if self.sink_rows > 0 {
            out.push((0, self.sink_rows));
        }
        let end = self.row_of(p1 - 1) + 1;
        match self.window {
            None => out.push((self.row_of(self.first_pos), end)),
            Some((sinks, w)) => {
                let win_lo = (p0 + 1).saturating_sub(w).max(self.first_pos);
                let sink_hi = sinks.min(p1).max(self.first_pos); // sinks among the contiguous rows
                if sink_hi >= win_lo {
                    out.push((self.row_of(self.first_pos), end));
                } else {
                    if sink_hi > self.first_pos {
                        out.push((self.row_of(self.first_pos), self.row_of(sink_hi)));
                    }
                    out.push((self.row_of(win_lo), end));
                }
            }
        }
        out
    }
}

/// Rows of the microkernels (4 on every set: 4 x 16 lanes is 4 AVX-512 or 8 AVX2 accumulators;
/// 4 x 32 and 8 x 16 on AVX-512 measured 8x and 1.5x slower here, the accumulators spilled); query
/// rows are padded to a multiple of it.
const MR_MAX: usize = 4;
/// Keys per tile.
const BC: usize = 64;
/// Query rows (positions x heads of a group) a task aims for.
const ROWS: usize = 64;

struct PrefillAttention {
    scale: f32,
    rule: KeyRule,
    isa: Isa,
}

/// Shapes and views of one call.
struct Job<'a, E> {
    q: View<'a, f32>,
    k: View<'a, E>,
    v: View<'a, E>,
    g: usize,
    t: usize,
    hd: usize,
    /// Position of the first query.
    q_first: usize,
    /// Query positions per task.
    bq: usize,
    scale: f32,
    rule: KeyRule,
}

/// What a task computed: its (batch, KV head, first query index), and the normalised outputs of
/// its rows, row-major (position, head), hd each.
type TileOut = (usize, usize, usize, usize, Vec<f32>);

#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    // With FMA in the instruction set `mul_add` is one instruction; without it a libm call, so
    // the portable path multiplies and adds.
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// s[rb.., cb..cb+NC] = qs[rb..rb+MR] · kt[.., cb..cb+NC] over `hdp` dims: MR x NC accumulators
/// held in registers, one key-tile row loaded per dim for all MR query rows.
#[inline(always)]
fn qk_block<const MR: usize, const NC: usize, const F: bool>(
    qs: &[f32],
    kt: &[f32],
    s: &mut [f32],
    rb: usize,
    cb: usize,
    hdp: usize,
) {
    let mut acc = [[0f32; NC]; MR];
    let qr: [&[f32]; MR] = std::array::from_fn(|r| &qs[(rb + r) * hdp..(rb + r + 1) * hdp]);
    for d in 0..hdp {
        let krow: &[f32; NC] = kt[d * BC + cb..d * BC + cb + NC]
            .try_into()
            .expect("NC columns");
        for r in 0..MR {
            let qv = qr[r][d];
            for c in 0..NC {
                acc[r][c] = fma::<F>(qv, krow[c], acc[r][c]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        s[(rb + r) * BC + cb..(rb + r) * BC + cb + NC].copy_from_slice(a);
    }
}

/// o[rb.., cb..cb+NC] += p[rb..rb+MR, 0..n] · vt[0..n, cb..cb+NC].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_block<const MR: usize, const NC: usize, const F: bool>(
    p: &[f32],
    vt: &[f32],
    o: &mut [f32],
    rb: usize,
    cb: usize,
    hdp: usize,
    n: usize,
) {
    let mut acc = [[0f32; NC]; MR];
    for (r, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&o[(rb + r) * hdp + cb..(rb + r) * hdp + cb + NC]);
    }
    let pr: [&[f32]; MR] = std::array::from_fn(|r| &p[(rb + r) * BC..(rb + r) * BC + n]);
    for j in 0..n {
        let vrow: &[f32; NC] = vt[j * hdp + cb..j * hdp + cb + NC]
            .try_into()
            .expect("NC columns");
        for r in 0..MR {
            let pv = pr[r][j];
            for c in 0..NC {
                acc[r][c] = fma::<F>(pv, vrow[c], acc[r][c]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        o[(rb + r) * hdp + cb..(rb + r) * hdp + cb + NC].copy_from_slice(a);
    }
}

impl<E: KvElem> Job<'_, E> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2(&self, task: (usize, usize, usize)) -> TileOut
    where
        super::simd::Avx2: RowOps<E>,
    {
        self.tile::<super::simd::Avx2, 4, 16, true>(task)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile_avx512(&self, task: (usize, usize, usize)) -> TileOut
    where
        super::simd::Avx512: RowOps<E>,
    {
        self.tile::<super::simd::Avx512, 4, 16, true>(task)
    }

    /// One task: the queries `qt*bq..` of KV head `kh` in sequence `bi`, all their visible keys.
    #[inline(always)]
    fn tile<O: RowOps<E>, const MR: usize, const NC: usize, const F: bool>(
        &self,
        (bi, kh, qt): (usize, usize, usize),
    ) -> TileOut {
        let (g, hd, rule) = (self.g, self.hd, self.rule);
        let hdp = hd.div_ceil(NC) * NC;
        let i0 = qt * self.bq;
        let np = self.bq.min(self.t - i0);
        let (p0, p1) = (self.q_first + i0, self.q_first + i0 + np);
        let rows = np * g;
        let rows_p = rows.div_ceil(MR_MAX) * MR_MAX;
        // Rows (position, head); padding rows repeat the last position with a zero query.
        let rowpos: Vec<usize> = (0..rows_p).map(|r| p0 + (r / g).min(np - 1)).collect();
        let mut qs = vec![0f32; rows_p * hdp];
        for r in 0..rows {
            let (pi, gi) = (r / g, r % g);
            let src = self.q.row(bi, kh * g + gi, i0 + pi, hd);
            for (x, y) in qs[r * hdp..r * hdp + hd].iter_mut().zip(src) {
                *x = y * self.scale;
            }
        }
        let mut kt = vec![0f32; hdp * BC]; // keys transposed: (hdp, BC)
        let mut vt = vec![0f32; BC * hdp]; // values: (BC, hdp)
        let mut s = vec![0f32; rows_p * BC];
        let mut o = vec![0f32; rows_p * hdp];
        let mut m = vec![f32::NEG_INFINITY; rows_p];
        let mut l = vec![0f32; rows_p];
        let mut krow = vec![0f32; hd];
        let mut jpos = [0usize; BC];
        for (lo, hi) in rule.ranges(p0, p1) {
            let mut r0 = lo;
            while r0 < hi {
                let n = BC.min(hi - r0);
                let ncols = n.div_ceil(NC) * NC;
                for jj in 0..n {
                    jpos[jj] = rule.pos_of(r0 + jj);
                    O::load(&mut krow, self.k.row(bi, kh, r0 + jj, hd));
                    for (d, &x) in krow.iter().enumerate() {
                        kt[d * BC + jj] = x;
                    }
                    O::load(
                        &mut vt[jj * hdp..jj * hdp + hd],
                        self.v.row(bi, kh, r0 + jj, hd),
                    );
                }
                for jj in n..ncols {
                    for d in 0..hd {
                        kt[d * BC + jj] = 0.0;
                    }
                }
                for rb in (0..rows_p).step_by(MR) {
                    for cb in (0..ncols).step_by(NC) {
                        qk_block::<MR, NC, F>(&qs, &kt, &mut s, rb, cb, hdp);
                    }
                }
                // Mask only where some (row, key) pair is hidden: a tile past the first query's
                // diagonal, or reaching outside the last query's window.
                let all_visible = jpos[n - 1] <= p0
                    && match rule.window {
                        None => true,
                        Some((sinks, w)) => jpos[..n]
                            .iter()
                            .find(|&&j| j >= sinks)
                            .is_none_or(|&j| p1 - 1 - j < w),
                    };
                for r in 0..rows_p {
                    let row = &mut s[r * BC..r * BC + ncols];
                    if !all_visible {
                        for (x, &j) in row[..n].iter_mut().zip(&jpos[..n]) {
                            if !rule.visible(rowpos[r], j) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    row[n..].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                    // Online softmax update of this row.
                    let mx = row_max(row, m[r]);
                    if mx == f32::NEG_INFINITY {
                        row.iter_mut().for_each(|x| *x = 0.0); // nothing visible yet
                        continue;
                    }
                    let alpha = exp_nonpositive(m[r] - mx); // 0 when m was -inf
                    let sum = exp_shift_sum(row, mx);
                    l[r] = l[r] * alpha + sum;
                    m[r] = mx;
                    if alpha != 1.0 {
                        o[r * hdp..(r + 1) * hdp]
                            .iter_mut()
                            .for_each(|x| *x *= alpha);
                    }
                }
                for rb in (0..rows_p).step_by(MR) {
                    for cb in (0..hdp).step_by(NC) {
                        pv_block::<MR, NC, F>(&s, &vt, &mut o, rb, cb, hdp, n);
                    }
                }
                r0 += n;
            }
        }
        let mut out = vec![0f32; rows * hd];
        for r in 0..rows {
            let inv = 1.0 / l[r];
            for (x, &y) in out[r * hd..(r + 1) * hd].iter_mut().zip(&o[r * hdp..]) {
                *x = y * inv;
            }
        }
        (bi, kh, i0, np, out)
    }
}

impl PrefillAttention {
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
        const OP: &str = "prefill attention";
        let (b, nh, t, hd) = ql.shape().dims4()?;
        let (kb, nkv, s, khd) = kl.shape().dims4()?;
        let rule = self.rule;
        if kb != b
            || khd != hd
            || kl.shape() != vl.shape()
            || nkv == 0
            || nh % nkv != 0
            || t == 0
            || s < t + rule.sink_rows
            || rule.sink_rows > rule.first_pos
            || rule
                .window
                .is_some_and(|(sinks, w)| w == 0 || rule.sink_rows > sinks)
        {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?}, v {:?} with {rule:?} do not fit together",
                ql.shape().dims(),
                kl.shape().dims(),
                vl.shape().dims()
            );
        }
        let g = nh / nkv;
        let end = rule.first_pos + (s - rule.sink_rows); // one past the last key position
        let bq = (ROWS / g).max(1);
        let job = Job {
            q: view::<f32>(qs, ql, OP, "q")?,
            k: view::<E>(ks, kl, OP, "k")?,
            v: view::<E>(vs, vl, OP, "v")?,
            g,
            t,
            hd,
            q_first: end - t,
            bq,
            scale: self.scale,
            rule,
        };
        // Later query tiles see more keys: hand them out first so the pool ends evenly.
        let ntiles = t.div_ceil(bq);
        let tasks: Vec<(usize, usize, usize)> = (0..ntiles)
            .rev()
            .flat_map(|qt| (0..b).flat_map(move |bi| (0..nkv).map(move |kh| (bi, kh, qt))))
            .collect();
        let isa = self.isa;
        let tiles: Vec<TileOut> = tasks
            .par_iter()
            .map(|&task| match isa {
                // SAFETY: `isa` is one the CPU supports (checked by `prefill_attention_on`).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { job.tile_avx512(task) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { job.tile_avx2(task) },
                _ => job.tile::<Scalar, 4, 16, false>(task),
            })
            .collect();
        let mut out = vec![0f32; b * nh * t * hd];
        for (bi, kh, i0, np, rows) in tiles {
            for pi in 0..np {
                for gi in 0..g {
                    let h = kh * g + gi;
                    let dst = ((bi * nh + h) * t + i0 + pi) * hd;
                    let src = (pi * g + gi) * hd;
                    out[dst..dst + hd].copy_from_slice(&rows[src..src + hd]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, nh, t, hd))))
    }
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "prefill-attention"
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
                "prefill attention: keys {a:?} and values {b:?}; both f32 or both f16"
            ),
        }
    }
}

/// Attention of q (b, nh, t, hd), f32, the last t positions, against k, v (b, nkv, s, hd) laid out
/// and restricted as `rule` says (f32 or f16, last dim contiguous, views into a larger cache
/// allowed), with scale 1/sqrt(hd): returns (b, nh, t, hd), f32. On the best instruction set of
/// this CPU ([`Isa::detect`]).
pub fn prefill_attention(q: &Tensor, k: &Tensor, v: &Tensor, rule: KeyRule) -> Result<Tensor> {
    prefill_attention_on(Isa::detect(), q, k, v, rule)
}

/// [`prefill_attention`] on a given instruction set, one of `Isa::available()`.
pub fn prefill_attention_on(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rule: KeyRule,
) -> Result<Tensor> {
    if !Isa::available().contains(&isa) {
        candle_core::bail!("prefill attention: this CPU cannot run {isa:?}");
    }
    let hd = q.dim(3)?;
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &PrefillAttention {
            scale: 1.0 / (hd as f32).sqrt(),
            rule,
            isa,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn rand(shape: &[usize], seed: u64, amp: f32) -> Result<Tensor> {
        // A small portable generator: the test must not depend on a crate's stream.
        let mut st = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                ((st >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The textbook computation over a full key tensor (positions = rows): repeated KV heads,
    /// the whole score matrix, -inf where `rule` hides a key, softmax, P V.
    fn eager(q: &Tensor, k: &Tensor, v: &Tensor, rule: KeyRule) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let g = nh / nkv;
        let rep = |x: &Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?
                .broadcast_as((b, nkv, g, s, hd))?
                .reshape((b, nh, s, hd))
        };
        let scores = (q.matmul(&rep(k)?.t()?)? / (hd as f64).sqrt())?; // (b, nh, t, s)
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if rule.visible(s - t + i, j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu)?;
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        p.matmul(&rep(v)?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Prefill from position 0 and chunks after a cached prefix, causal and windowed, group sizes
    /// 1 and 3, head dims that are and are not a multiple of the lanes, on every instruction set
    /// this CPU has, with f32 and f16 keys / values; against the eager computation on the same
    /// (f16-rounded) keys and values.
    #[test]
    fn tiled_prefill_matches_the_eager_computation() -> Result<()> {
        let sets = Isa::available();
        for (t, s, nh, nkv, hd, window) in [
            (300, 300, 6, 2, 16, None),
            (130, 200, 3, 3, 8, None),
            (1, 77, 4, 1, 64, None),
            (257, 257, 9, 3, 64, Some((4, 32))),
            (70, 150, 6, 2, 24, Some((0, 7))),
            (40, 40, 2, 1, 16, Some((4, 100))),
            (65, 65, 3, 1, 16, Some((3, 1))),
        ] {
            let q = rand(&[2, nh, t, hd], 1, 2.0)?;
            let k = rand(&[2, nkv, s, hd], 2, 2.0)?;
            let v = rand(&[2, nkv, s, hd], 3, 1.0)?;
            let rule = KeyRule {
                window,
                ..Default::default()
            };
            for dt in [DType::F32, DType::F16] {
                let (kd, vd) = (k.to_dtype(dt)?, v.to_dtype(dt)?);
                let want = eager(
                    &q,
                    &kd.to_dtype(DType::F32)?,
                    &vd.to_dtype(DType::F32)?,
                    rule,
                )?;
                for &isa in &sets {
                    let got = prefill_attention_on(isa, &q, &kd, &vd, rule)?;
                    let d = max_diff(&got, &want)?;
                    println!(
                        "t {t} s {s} nh {nh}/{nkv} hd {hd} {window:?} {dt:?} {isa:?}: {d:.2e}"
                    );
                    assert!(d < 2e-5, "t {t} s {s} {window:?} {dt:?} {isa:?}: {d}");
                }
            }
        }
        Ok(())
    }

    /// Keys in a windowed cache's layout (sinks kept apart from the recent rows) give what the same
    /// keys at their positions in a full tensor give.
    #[test]
    fn windowed_cache_layout_equals_the_full_layout() -> Result<()> {
        let (nh, nkv, hd, sinks, w) = (4, 2, 16, 4, 32);
        let total = 200; // positions 0..200; the last 20 are new queries
        let t = 20;
        let q = rand(&[1, nh, t, hd], 4, 2.0)?;
        let k = rand(&[1, nkv, total, hd], 5, 2.0)?;
        let v = rand(&[1, nkv, total, hd], 6, 1.0)?;
        let rule = KeyRule {
            window: Some((sinks, w)),
            ..Default::default()
        };
        let want = prefill_attention(&q, &k, &v, rule)?;
        // WindowKv keeps the sinks and the window - 1 positions before the new keys.
        let first = total - t - (w - 1);
        let pick = |x: &Tensor| -> Result<Tensor> {
            Tensor::cat(
                &[x.narrow(2, 0, sinks)?, x.narrow(2, first, total - first)?],
                2,
            )
        };
        let got = prefill_attention(
            &q,
            &pick(&k)?,
            &pick(&v)?,
            KeyRule {
                window: Some((sinks, w)),
                sink_rows: sinks,
                first_pos: first,
            },
        )?;
        let d = max_diff(&got, &want)?;
        assert!(d < 1e-6, "{d}");
        // A shape that does not fit is refused with the shapes in the message.
        let e = prefill_attention(&q, &k.narrow(2, 0, 10)?, &v.narrow(2, 0, 10)?, rule)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        Ok(())
    }
}
