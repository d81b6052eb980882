//! The mixer's decode step as one CPU kernel (issue 20): conv-state update, causal conv + SiLU,
//! Δ = softplus, the selective-scan recurrence for one token, the skip D x, the output gate and
//! the gated RMSNorm, in one pass over plain slices. It computes what `MambaMixer::step_reference`
//! computes with ~40 candle ops (kept beside it as the reference it is tested against); measured
//! in BENCHMARKS.md ("Where a decode step goes"), those ops cost 1.45 ms of a 21 ms step over the
//! 27 mixers of the default 50 % conversion, mostly per-op overhead on tensors of a few hundred
//! values.
//!
//! The recurrence is Mamba-2's (Dao & Gu 2024, arXiv:2405.21060, section 6; the decode step of
//! `mamba_ssm/modules/mamba2.py` v2.2.2 `step`, itself the selective-scan recurrence of Gu & Dao
//! 2023, arXiv:2312.00752, Algorithm 2), per head i of group gr(i), for one token:
//!   h_i = exp(Δ_i A_i) h_i + Δ_i x_gr B_grᵀ      (P x N)
//!   y_i = h_i C_i + D_i x_gr
//!   out_i = rmsnorm_P(y_i ⊙ silu(z_i)) ⊙ norm_weight_i
//! with the glossary of `mod.rs`. The loops are our own; the inner loops over the N state
//! entries run in a function compiled for the instruction set the CPU has, chosen at run time
//! (`kernels::simd::Isa`), and vectorised by the compiler over 16 independent accumulators.
//! Sums over P and N are formed in f32 in a different order from candle's reductions, which is
//! the whole difference between the two paths (a few ulps of each 64-term sum).

use crate::model::kernels::simd::Isa;

/// Sizes of one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepDims {
    /// Sequences in the batch.
    pub bsz: usize,
    /// Replaced KV groups (G), query heads per group (g), head size (P), state size (N), conv
    /// kernel (K).
    pub n_groups: usize,
    pub group_size: usize,
    pub head_dim: usize,
    pub state_size: usize,
    pub conv_kernel: usize,
}

impl StepDims {
    fn n(&self) -> usize {
        self.n_groups * self.group_size
    }
    /// Conv channels [x | B | C].
    fn ch(&self) -> usize {
        self.n_groups * (self.head_dim + self.state_size) + self.n() * self.state_size
    }
    /// Width of one row of the projections' output: [x | B | C | Δ pre-activation | z].
    pub fn proj_width(&self) -> usize {
        self.ch() + self.n() + self.n() * self.head_dim
    }
}

/// The mixer's parameters the step reads besides the projections, as f32 slices.
pub(crate) struct StepParams<'a> {
    /// (C_ch, K), tap K-1 on the current token.
    pub conv_weight: &'a [f32],
    /// (C_ch)
    pub conv_bias: &'a [f32],
    /// (n)
    pub dt_bias: &'a [f32],
    /// (n), A = -exp(A_log)
    pub a_log: &'a [f32],
    /// (n)
    pub d: &'a [f32],
    /// (n*P)
    pub z_bias: &'a [f32],
    /// (n*P)
    pub norm_weight: &'a [f32],
}

/// Buffers of one step: `proj` (bsz, proj_width) in, `conv` (bsz, C_ch, K-1) in, `ssm`
/// (bsz, n, P, N) advanced in place, `new_conv` (bsz, C_ch, K-1) and `out` (bsz, n*P) written.
pub(crate) struct StepBuffers<'a> {
    pub proj: &'a [f32],
    pub conv: &'a [f32],
    pub ssm: &'a mut [f32],
    pub new_conv: &'a mut [f32],
    pub out: &'a mut [f32],
}

/// Runs one decode step on the instruction set `isa` (`Isa::detect()`; tests run every one this
/// CPU has). The caller checks the lengths ([`check_lengths`]).
pub(crate) fn mixer_step_on(
    isa: Isa,
    dims: &StepDims,
    p: &StepParams,
    b: StepBuffers,
    norm_eps: f32,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` / `Isa::available` only return these sets on a CPU that has them.
        Isa::Avx512 => unsafe { step_avx512(dims, p, b, norm_eps) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { step_avx2(dims, p, b, norm_eps) },
        _ => step_body(dims, p, b, norm_eps),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn step_avx512(dims: &StepDims, p: &StepParams, b: StepBuffers, norm_eps: f32) {
    step_body(dims, p, b, norm_eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn step_avx2(dims: &StepDims, p: &StepParams, b: StepBuffers, norm_eps: f32) {
    step_body(dims, p, b, norm_eps)
}

/// A message naming the first buffer or parameter whose length does not fit `dims`.
pub(crate) fn check_lengths(dims: &StepDims, p: &StepParams, b: &StepBuffers) -> Option<String> {
    let (bsz, n, ch, k) = (dims.bsz, dims.n(), dims.ch(), dims.conv_kernel);
    let pn = n * dims.head_dim;
    let want = [
        ("conv.weight", p.conv_weight.len(), ch * k),
        ("conv.bias", p.conv_bias.len(), ch),
        ("dt_bias", p.dt_bias.len(), n),
        ("A_log", p.a_log.len(), n),
        ("D", p.d.len(), n),
        ("z_bias", p.z_bias.len(), pn),
        ("norm.weight", p.norm_weight.len(), pn),
        ("projections", b.proj.len(), bsz * dims.proj_width()),
        ("conv state", b.conv.len(), bsz * ch * (k - 1)),
        ("ssm state", b.ssm.len(), bsz * pn * dims.state_size),
        ("new conv state", b.new_conv.len(), bsz * ch * (k - 1)),
        ("output", b.out.len(), bsz * pn),
    ];
    want.iter()
        .find(|(_, got, want)| got != want)
        .map(|(name, got, want)| {
            format!("mixer step: {name} holds {got} values, expected {want} for {dims:?}")
        })
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// softplus(v) = log(1 + e^v), as max(v, 0) + log1p(e^{-|v|}) (no overflow for large |v|).
#[inline(always)]
fn softplus(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// Lanes of the state loop: 16 f32 (one AVX-512 register, two AVX2 ones).
const LANES: usize = 16;

#[inline(always)]
fn step_body(dims: &StepDims, prm: &StepParams, b: StepBuffers, norm_eps: f32) {
    let StepDims {
        bsz,
        n_groups: g_,
        group_size: g,
        head_dim: p,
        state_size: ns,
        conv_kernel: k,
    } = *dims;
    let (n, ch, width) = (dims.n(), dims.ch(), dims.proj_width());
    let km = k - 1;
    let mut xbc = vec![0f32; ch];
    let mut v = vec![0f32; p];
    for s in 0..bsz {
        let row = &b.proj[s * width..(s + 1) * width];
        let (xin, rest) = row.split_at(ch); // [x | B | C] before the conv
        let (dt_pre, z_pre) = rest.split_at(n);
        let conv = &b.conv[s * ch * km..(s + 1) * ch * km];
        let new_conv = &mut b.new_conv[s * ch * km..(s + 1) * ch * km];
        // Causal conv over [K-1 previous inputs | this input], tap K-1 on this one, + bias, SiLU.
        for c in 0..ch {
            let w = &prm.conv_weight[c * k..(c + 1) * k];
            let prev = &conv[c * km..(c + 1) * km];
            let mut acc = prm.conv_bias[c] + w[km] * xin[c];
            for j in 0..km {
                acc += w[j] * prev[j];
            }
            xbc[c] = silu(acc);
            let nc = &mut new_conv[c * km..(c + 1) * km];
            nc[..km - 1].copy_from_slice(&prev[1..]);
            nc[km - 1] = xin[c];
        }
        let (xs, bc) = xbc.split_at(g_ * p);
        let (bs, cs) = bc.split_at(g_ * ns);
        let h_seq = &mut b.ssm[s * n * p * ns..(s + 1) * n * p * ns];
        let out = &mut b.out[s * n * p..(s + 1) * n * p];
        for i in 0..n {
            let gr = i / g;
            let dt = softplus(dt_pre[i] + prm.dt_bias[i]);
            let decay = (-dt * prm.a_log[i].exp()).exp(); // exp(Δ A), A = -exp(A_log)
            let x = &xs[gr * p..(gr + 1) * p];
            let bv = &bs[gr * ns..(gr + 1) * ns];
            let cv = &cs[i * ns..(i + 1) * ns];
            let h_head = &mut h_seq[i * p * ns..(i + 1) * p * ns];
            let mut sq = 0f32;
            for (j, hrow) in h_head.chunks_exact_mut(ns).enumerate() {
                let dx = dt * x[j];
                let mut acc = [0f32; LANES];
                let mut hc = hrow.chunks_exact_mut(LANES);
                let mut bcn = bv.chunks_exact(LANES);
                let mut ccn = cv.chunks_exact(LANES);
                for ((hh, bb), cc) in (&mut hc).zip(&mut bcn).zip(&mut ccn) {
                    for l in 0..LANES {
                        let nh = decay * hh[l] + dx * bb[l];
                        hh[l] = nh;
                        acc[l] += nh * cc[l];
                    }
                }
                let mut y: f32 = acc.iter().sum();
                for ((hh, bb), cc) in hc
                    .into_remainder()
                    .iter_mut()
                    .zip(bcn.remainder())
                    .zip(ccn.remainder())
                {
                    let nh = decay * *hh + dx * bb;
                    *hh = nh;
                    y += nh * cc;
                }
                y += prm.d[i] * x[j];
                let zj = z_pre[i * p + j] + prm.z_bias[i * p + j];
                let vj = y * silu(zj);
                v[j] = vj;
                sq += vj * vj;
            }
            let r = 1.0 / (sq / p as f32 + norm_eps).sqrt();
            let nw = &prm.norm_weight[i * p..(i + 1) * p];
            for j in 0..p {
                out[i * p + j] = v[j] * r * nw[j];
            }
        }
    }
}
