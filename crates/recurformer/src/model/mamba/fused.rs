//! The selective scan as one CPU operation with a hand-written backward (issue 19).
//!
//! Per sequence and SSM head the recurrence of `scan_reference`, written as loops over plain
//! slices instead of a graph of tensor ops:
//!
//!   h_t = exp(ΔA_t) h_{t-1} + u_t B_tᵀ,   y_t = h_t C_t,
//!
//! with u_t = Δ_t x_t (P), B_t, C_t (N), h (P, N), h_{-1} = 0. The skip term D x and the
//! products ΔA = Δ A, u = Δ x stay candle ops around it, so their gradients come from autograd.
//! The chunked SSD scan (`scan_chunked`) builds about thirty tensors per call and records each of
//! them for the backward. Measured in a distillation step of the default model (BENCHMARKS.md,
//! "Where a distillation step goes"), the two cost the same at 256 tokens and the fused op is
//! ~20 % faster over the 27 mixers at 1024: the scan is a small part of a mixer's time, next to
//! its projections.
//!
//! Backward, for the upstream gradients gy_t and g_{h_T} of the final state: with
//! G_t = ∂L/∂h_t = gy_t C_tᵀ + exp(ΔA_{t+1}) G_{t+1} (G_T starts from g_{h_T}),
//!   ∂L/∂C_t = h_tᵀ gy_t,  ∂L/∂u_t = G_t B_t,  ∂L/∂B_t = G_tᵀ u_t,
//!   ∂L/∂ΔA_t = exp(ΔA_t) ⟨G_t, h_{t-1}⟩.
//! The states are not kept from the forward (t P N values per head): the backward runs the
//! recurrence again, keeping a checkpoint every [`CHECKPOINT`] tokens, and recomputes each
//! stretch's states from its checkpoint while walking it backwards.
//!
//! The P rows of h evolve independently (row j only reads u_t[j]), so the work is split into
//! lanes of (sequence, head, block of [`ROWS`] rows) run in parallel (rayon): a layer of three
//! heads still fills both cores. The sums over rows (∂B, ∂C, ∂ΔA) are per-lane partial sums added
//! in a fixed order afterwards, so results do not depend on the thread count.

use crate::model::kernels::{cpu_slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Tokens between two saved states in the backward's recomputation.
const CHECKPOINT: usize = 32;

/// Rows of the state per lane.
const ROWS: usize = 16;

/// Sizes of one call: `bsz` sequences of `t` tokens, `n` heads of `p` channels and `ns` states.
#[derive(Debug, Clone, Copy)]
struct Dims {
    bsz: usize,
    t: usize,
    n: usize,
    p: usize,
    ns: usize,
}

impl Dims {
    /// From da (bsz, t, n), u (bsz, t, n, P), bc (bsz, t, n, 2N).
    fn of(da: &Shape, u: &Shape, bc: &Shape) -> candle_core::Result<Self> {
        let (bsz, t, n) = da.dims3()?;
        let (ub, ut, un, p) = u.dims4()?;
        let (bb, bt, bn, n2) = bc.dims4()?;
        if (ub, ut, un) != (bsz, t, n) || (bb, bt, bn) != (bsz, t, n) || n2 % 2 != 0 {
            candle_core::bail!(
                "selective-scan: ΔA {:?}, u {:?} and [B|C] {:?} do not fit together",
                da.dims(),
                u.dims(),
                bc.dims()
            );
        }
        Ok(Dims {
            bsz,
            t,
            n,
            p,
            ns: n2 / 2,
        })
    }
}

/// One (sequence, head, rows j0..j1) lane of the inputs, read in place from the contiguous
/// buffers.
struct Lane<'a, T> {
    da: &'a [T],
    u: &'a [T],
    bc: &'a [T],
    d: Dims,
    b: usize,
    i: usize,
    j0: usize,
    j1: usize,
}

impl<'a, T: Real> Lane<'a, T> {
    fn decay(&self, s: usize) -> T {
        self.da[(self.b * self.d.t + s) * self.d.n + self.i].exp()
    }
    /// u_s[j0..j1].
    fn u(&self, s: usize) -> &'a [T] {
        let Dims { t, n, p, .. } = self.d;
        let o = ((self.b * t + s) * n + self.i) * p;
        &self.u[o + self.j0..o + self.j1]
    }
    fn rows(&self) -> usize {
        self.j1 - self.j0
    }
    /// (B_s, C_s).
    fn bc(&self, s: usize) -> (&'a [T], &'a [T]) {
        let Dims { t, n, ns, .. } = self.d;
        let o = ((self.b * t + s) * n + self.i) * 2 * ns;
        (&self.bc[o..o + ns], &self.bc[o + ns..o + 2 * ns])
    }
    /// h <- exp(ΔA_s) h + u_s B_sᵀ.
    fn step(&self, h: &mut [T], s: usize) {
        let a = self.decay(s);
        let (bs, _) = self.bc(s);
        let ns = self.d.ns;
        for (row, &up) in h.chunks_exact_mut(ns).zip(self.u(s)) {
            for (hv, &bv) in row.iter_mut().zip(bs) {
                *hv = a * *hv + up * bv;
            }
        }
    }
}

/// Σ a_i b_i with eight independent partial sums, so the compiler can keep them in one vector
/// register instead of waiting on each add (a single running sum is bound by the add latency).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = T::default();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let mut acc = [T::default(); 8];
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Forward of one lane: y (t, rows) then the final state transposed (N, rows).
fn lane_forward<T: Real>(lane: &Lane<T>) -> Vec<T> {
    let Dims { t, ns, .. } = lane.d;
    let p = lane.rows();
    let mut h = vec![T::default(); p * ns];
    let mut out = Vec::with_capacity((t + ns) * p);
    for s in 0..t {
        lane.step(&mut h, s);
        let (_, cs) = lane.bc(s);
        out.extend(h.chunks_exact(ns).map(|row| dot(row, cs)));
    }
    for k in 0..ns {
        out.extend((0..p).map(|j| h[j * ns + k]));
    }
    out
}

/// Gradients of one lane: (∂ΔA (t), ∂u (t, rows), ∂[B|C] (t, 2N)), the first and last being
/// this lane's share of sums over rows, given gy (t, P) and the final state's gradient transposed
/// (N, P), both read from `g` laid out as the op's output.
fn lane_backward<T: Real>(lane: &Lane<T>, g: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { t, n, ns, .. } = lane.d;
    let pp = lane.d.p;
    let p = lane.rows();
    let gy = |s: usize| -> &[T] {
        let o = ((lane.b * (t + ns) + s) * n + lane.i) * pp;
        &g[o + lane.j0..o + lane.j1]
    };
    // Checkpoints: the state before token c*CHECKPOINT.
    let stretches = t.div_ceil(CHECKPOINT);
    let mut checkpoints = Vec::with_capacity(stretches);
    let mut h = vec![T::default(); p * ns];
    for s in 0..t {
        if s % CHECKPOINT == 0 {
            checkpoints.push(h.clone());
        }
        lane.step(&mut h, s);
    }
    // G starts as the final state's gradient.
    let mut gh = vec![T::default(); p * ns];
    for k in 0..ns {
        let row = gy(t + k);
        for j in 0..p {
            gh[j * ns + k] = row[j];
        }
    }
    let (mut g_da, mut g_u, mut g_bc) = (
        vec![T::default(); t],
        vec![T::default(); t * p],
        vec![T::default(); t * 2 * ns],
    );
    let mut states: Vec<Vec<T>> = Vec::with_capacity(CHECKPOINT + 1);
    for c in (0..stretches).rev() {
        let (lo, hi) = (c * CHECKPOINT, ((c + 1) * CHECKPOINT).min(t));
        // states[k] = h_{lo+k-1}: the state before token lo+k.
        states.clear();
        states.push(checkpoints[c].clone());
        for s in lo..hi {
            let mut next = states.last().expect("non-empty").clone();
            lane.step(&mut next, s);
            states.push(next);
        }
        for s in (lo..hi).rev() {
            let (h_prev, h_s) = (&states[s - lo], &states[s - lo + 1]);
            let (bs, cs) = lane.bc(s);
            let (us, gys) = (lane.u(s), gy(s));
            // G_t += gy_t C_tᵀ.
            for (row, &gv) in gh.chunks_exact_mut(ns).zip(gys) {
                for (x, &cv) in row.iter_mut().zip(cs) {
                    *x += gv * cv;
                }
            }
            let gbc = &mut g_bc[s * 2 * ns..(s + 1) * 2 * ns];
            let (gb, gc) = gbc.split_at_mut(ns);
            for (j, (hrow, grow)) in h_s.chunks_exact(ns).zip(gh.chunks_exact(ns)).enumerate() {
                let (gyj, uj) = (gys[j], us[j]);
                for k in 0..ns {
                    gc[k] += hrow[k] * gyj;
                    gb[k] += grow[k] * uj;
                }
                g_u[s * p + j] = dot(grow, bs);
            }
            let a = lane.decay(s);
            g_da[s] = a * dot(&gh, h_prev);
            for x in gh.iter_mut() {
                *x *= a;
            }
        }
    }
    (g_da, g_u, g_bc)
}

/// Every lane's (sequence, head, first row, end row), sequences outermost.
fn lanes(d: Dims) -> Vec<(usize, usize, usize, usize)> {
    let blocks: Vec<(usize, usize)> = (0..d.p)
        .step_by(ROWS)
        .map(|j0| (j0, (j0 + ROWS).min(d.p)))
        .collect();
    (0..d.bsz)
        .flat_map(|b| (0..d.n).map(move |i| (b, i)))
        .flat_map(|(b, i)| blocks.iter().map(move |&(j0, j1)| (b, i, j0, j1)))
        .collect()
}

fn forward_typed<T: Real>(
    s: [(&CpuStorage, &Layout); 3],
) -> candle_core::Result<(CpuStorage, Shape)> {
    let d = Dims::of(s[0].1.shape(), s[1].1.shape(), s[2].1.shape())?;
    let (da, u, bc) = (
        cpu_slice::<T>(s[0].0, s[0].1, "selective-scan", "ΔA")?,
        cpu_slice::<T>(s[1].0, s[1].1, "selective-scan", "u")?,
        cpu_slice::<T>(s[2].0, s[2].1, "selective-scan", "[B|C]")?,
    );
    let per: Vec<Vec<T>> = lanes(d)
        .into_par_iter()
        .map(|(b, i, j0, j1)| {
            lane_forward(&Lane {
                da,
                u,
                bc,
                d,
                b,
                i,
                j0,
                j1,
            })
        })
        .collect();
    // Scatter lanes into (bsz, t + N, n, P).
    let Dims { bsz, t, n, p, ns } = d;
    let mut out = vec![T::default(); bsz * (t + ns) * n * p];
    for ((b, i, j0, j1), v) in lanes(d).into_iter().zip(per) {
        for (r, row) in v.chunks_exact(j1 - j0).enumerate() {
            let o = ((b * (t + ns) + r) * n + i) * p;
            out[o + j0..o + j1].copy_from_slice(row);
        }
    }
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((bsz, t + ns, n, p)),
    ))
}

/// The op: inputs ΔA (bsz, t, n), u (bsz, t, n, P), [B|C] (bsz, t, n, 2N); output
/// (bsz, t + N, n, P): rows 0..t are y, rows t.. the final state transposed (row t+k holds
/// h[:, k]).
pub(crate) struct SelectiveScan;

impl CustomOp3 for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective-scan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        match s1.dtype() {
            DType::F32 => forward_typed::<f32>(s),
            DType::F64 => forward_typed::<f64>(s),
            dt => candle_core::bail!("selective-scan runs in f32 or f64, not {dt:?}"),
        }
    }

    fn bwd(
        &self,
        da: &Tensor,
        u: &Tensor,
        bc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(da.shape(), u.shape(), bc.shape())?;
        let (a, b, c) = match da.dtype() {
            DType::F32 => backward_typed::<f32>(d, da, u, bc, grad)?,
            DType::F64 => backward_typed::<f64>(d, da, u, bc, grad)?,
            dt => candle_core::bail!("selective-scan runs in f32 or f64, not {dt:?}"),
        };
        Ok((Some(a), Some(b), Some(c)))
    }
}

fn flat<T: candle_core::WithDType>(x: &Tensor) -> candle_core::Result<Vec<T>> {
    x.flatten_all()?.to_vec1::<T>()
}

fn backward_typed<T: Real>(
    d: Dims,
    da: &Tensor,
    u: &Tensor,
    bc: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (da_v, u_v, bc_v, g_v) = (
        flat::<T>(da)?,
        flat::<T>(u)?,
        flat::<T>(bc)?,
        flat::<T>(grad)?,
    );
    let per: Vec<_> = lanes(d)
        .into_par_iter()
        .map(|(b, i, j0, j1)| {
            let lane = Lane {
                da: &da_v,
                u: &u_v,
                bc: &bc_v,
                d,
                b,
                i,
                j0,
                j1,
            };
            lane_backward(&lane, &g_v)
        })
        .collect();
    let Dims { bsz, t, n, p, ns } = d;
    let (mut g_da, mut g_u, mut g_bc) = (
        vec![T::default(); bsz * t * n],
        vec![T::default(); bsz * t * n * p],
        vec![T::default(); bsz * t * n * 2 * ns],
    );
    // Lanes come in a fixed order, so the partial sums over row blocks add up the same way
    // whatever the thread count.
    for ((b, i, j0, j1), (lda, lu, lbc)) in lanes(d).into_iter().zip(per) {
        let rows = j1 - j0;
        for s in 0..t {
            let r = (b * t + s) * n + i;
            g_da[r] += lda[s];
            g_u[r * p + j0..r * p + j1].copy_from_slice(&lu[s * rows..(s + 1) * rows]);
            for (x, &v) in g_bc[r * 2 * ns..(r + 1) * 2 * ns]
                .iter_mut()
                .zip(&lbc[s * 2 * ns..(s + 1) * 2 * ns])
            {
                *x += v;
            }
        }
    }
    let dev = da.device();
    Ok((
        Tensor::from_vec(g_da, (bsz, t, n), dev)?,
        Tensor::from_vec(g_u, (bsz, t, n, p), dev)?,
        Tensor::from_vec(g_bc, (bsz, t, n, 2 * ns), dev)?,
    ))
}

/// The scan of `ScanInputs` without an initial state through [`SelectiveScan`]: y (bsz, t, n, P)
/// including the skip term, and the final state (bsz, n, P, N).
pub(crate) fn scan_fused(inp: &super::scan::ScanInputs) -> anyhow::Result<(Tensor, Tensor)> {
    anyhow::ensure!(inp.h0.is_none(), "the fused scan starts from a zero state");
    let (bsz, t, n, p) = inp.x.dims4()?;
    let ns = inp.b.dim(3)?;
    let da = inp
        .dt
        .broadcast_mul(&inp.a.reshape((1, 1, n))?)?
        .contiguous()?; // (bsz, t, n)
    let u = inp.x.broadcast_mul(&inp.dt.unsqueeze(3)?)?.contiguous()?; // (bsz, t, n, P)
    let bc = Tensor::cat(&[inp.b, inp.c], 3)?.contiguous()?; // (bsz, t, n, 2N)
    let out = da.apply_op3(&u, &bc, SelectiveScan)?; // (bsz, t + N, n, P)
    let y = out.narrow(1, 0, t)?;
    let y = (y + inp.x.broadcast_mul(&inp.d.reshape((1, 1, n, 1))?)?)?;
    let h = out.narrow(1, t, ns)?.permute((0, 2, 3, 1))?; // (bsz, n, P, N)
    debug_assert_eq!(h.dims(), &[bsz, n, p, ns]);
    Ok((y, h))
}
