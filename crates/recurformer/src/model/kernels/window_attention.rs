//! Attention over the sinks plus a recent window, for a whole sequence from position 0, as one
//! CPU operation with a hand-written backward (issue 19): the training path of the windowed
//! heads beside each mixer. `window::windowed_attention` computes the same thing as a graph of
//! blocked matmuls, masks and a softmax; with 4 sinks and 32 recent keys a query sees at most 36
//! keys, and the op only touches those: in a distillation step of the default model the 27
//! windowed layers cost the same either way at 256 tokens and ~1.5x less with the op at 1024,
//! where the graph's blocks grow (BENCHMARKS.md, "Where a distillation step goes"); the q/k/v
//! projections around it are most of the part's time.
//!
//! Query i sees key j when j ≤ i and (j < sinks or i - j < window) — the rule of
//! `window::window_mask`. Forward per query: s_j = scale q·k_j over the visible keys,
//! p = softmax(s), o = Σ p_j v_j. Backward, given g = ∂L/∂o: dv_j += p_j g, dp_j = g·v_j,
//! ds_j = p_j (dp_j - Σ_k p_k dp_k), dq = scale Σ ds_j k_j, dk_j += scale ds_j q. The
//! probabilities are recomputed in the backward. One task per (sequence, KV head) owns that
//! head's key and value gradients, so lanes never write the same memory and results do not
//! depend on the thread count.

use super::Real;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The op; inputs q (b, n, t, hd), k and v (b, nkv, t, hd), contiguous; output (b, n, t, hd).
pub(crate) struct WindowAttention {
    pub(crate) sinks: usize,
    pub(crate) window: usize,
    pub(crate) scale: f64,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    nkv: usize,
    t: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Self> {
        let (b, n, t, hd) = q.dims4()?;
        let (kb, nkv, kt, khd) = k.dims4()?;
        if (kb, kt, khd) != (b, t, hd) || k.dims() != v.dims() || nkv == 0 || n % nkv != 0 {
            candle_core::bail!(
                "window-attention: q {:?}, k {:?}, v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Dims { b, n, nkv, t, hd })
    }
}

impl WindowAttention {
    /// The keys query `i` sees, in increasing order: the sinks before the window, then the window.
    fn keys(&self, i: usize) -> impl Iterator<Item = usize> {
        let lo = (i + 1).saturating_sub(self.window);
        (0..self.sinks.min(lo)).chain(lo..=i)
    }

    /// Scores -> probabilities of query `qi` (hd) against `k` rows, into `p` (visible keys).
    fn probs<T: Real>(&self, qi: &[T], k: &[T], hd: usize, i: usize, p: &mut Vec<T>) {
        p.clear();
        let scale = T::from_f64(self.scale);
        let mut max = T::from_f64(f64::NEG_INFINITY);
        for j in self.keys(i) {
            let s = scale * dot(qi, &k[j * hd..(j + 1) * hd]);
            if s > max {
                max = s;
            }
            p.push(s);
        }
        let mut sum = T::default();
        for x in p.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = T::from_f64(1.0) / sum;
        for x in p.iter_mut() {
            *x *= inv;
        }
    }

    fn forward_typed<T: Real>(
        &self,
        s: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(s[0].1.shape(), s[1].1.shape(), s[2].1.shape())?;
        let [q, k, v] = [(0, "q"), (1, "k"), (2, "v")]
            .map(|(x, what)| super::cpu_slice::<T>(s[x].0, s[x].1, "window-attention", what));
        let (q, k, v) = (q?, k?, v?);
        let Dims { b, n, nkv, t, hd } = d;
        let g = n / nkv;
        let mut out = vec![T::default(); b * n * t * hd];
        // One chunk of the output per (sequence, query head).
        out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / n, bh % n);
            let kv = bi * nkv + h / g;
            let (kk, vv) = (
                &k[kv * t * hd..(kv + 1) * t * hd],
                &v[kv * t * hd..(kv + 1) * t * hd],
            );
            let qh = &q[bh * t * hd..(bh + 1) * t * hd];
            let mut p = Vec::new();
            for i in 0..t {
                self.probs(&qh[i * hd..(i + 1) * hd], kk, hd, i, &mut p);
                let oi = &mut o[i * hd..(i + 1) * hd];
                for (j, &pj) in self.keys(i).zip(&p) {
                    for (x, &y) in oi.iter_mut().zip(&vv[j * hd..(j + 1) * hd]) {
                        *x += pj * y;
                    }
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), Shape::from((b, n, t, hd))))
    }

    fn backward_typed<T: Real>(
        &self,
        d: Dims,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let Dims { b, n, nkv, t, hd } = d;
        let g = n / nkv;
        let flat = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
        let (q, k, v, go) = (flat(q)?, flat(k)?, flat(v)?, flat(grad)?);
        let scale = T::from_f64(self.scale);
        let mut dq = vec![T::default(); b * n * t * hd];
        let mut dk = vec![T::default(); b * nkv * t * hd];
        let mut dv = vec![T::default(); b * nkv * t * hd];
        // One task per (sequence, KV head): its g query heads' dq, and the head's dk, dv.
        dq.par_chunks_mut(g * t * hd)
            .zip(dk.par_chunks_mut(t * hd))
            .zip(dv.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(kv, ((dq, dk), dv))| {
                let (kk, vv) = (
                    &k[kv * t * hd..(kv + 1) * t * hd],
                    &v[kv * t * hd..(kv + 1) * t * hd],
                );
                let (mut p, mut dp) = (Vec::new(), Vec::new());
                for r in 0..g {
                    let bh = kv * g + r; // (sequence, query head) row: heads of a group adjacent
                    let qh = &q[bh * t * hd..(bh + 1) * t * hd];
                    let gh = &go[bh * t * hd..(bh + 1) * t * hd];
                    let dqh = &mut dq[r * t * hd..(r + 1) * t * hd];
                    for i in 0..t {
                        let qi = &qh[i * hd..(i + 1) * hd];
                        let gi = &gh[i * hd..(i + 1) * hd];
                        self.probs(qi, kk, hd, i, &mut p);
                        dp.clear();
                        let mut pdp = T::default();
                        for (j, &pj) in self.keys(i).zip(&p) {
                            let x = dot(gi, &vv[j * hd..(j + 1) * hd]);
                            pdp += pj * x;
                            dp.push(x);
                            for (dvx, &gx) in dv[j * hd..(j + 1) * hd].iter_mut().zip(gi) {
                                *dvx += pj * gx;
                            }
                        }
                        let dqi = &mut dqh[i * hd..(i + 1) * hd];
                        for ((j, &pj), &dpj) in self.keys(i).zip(&p).zip(&dp) {
                            let ds = scale * pj * (dpj - pdp);
                            let kj = &kk[j * hd..(j + 1) * hd];
                            for (x, &y) in dqi.iter_mut().zip(kj) {
                                *x += ds * y;
                            }
                            for (x, &y) in dk[j * hd..(j + 1) * hd].iter_mut().zip(qi) {
                                *x += ds * y;
                            }
                        }
                    }
                }
            });
        let dev = grad.device();
        Ok((
            Tensor::from_vec(dq, (b, n, t, hd), dev)?,
            Tensor::from_vec(dk, (b, nkv, t, hd), dev)?,
            Tensor::from_vec(dv, (b, nkv, t, hd), dev)?,
        ))
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter()
        .zip(b)
        .fold(T::default(), |acc, (&x, &y)| acc + x * y)
}

impl CustomOp3 for WindowAttention {
    fn name(&self) -> &'static str {
        "window-attention"
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
            DType::F32 => self.forward_typed::<f32>(s),
            DType::F64 => self.forward_typed::<f64>(s),
            dt => candle_core::bail!("window-attention runs in f32 or f64, not {dt:?}"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.shape(), k.shape(), v.shape())?;
        let (a, b, c) = match q.dtype() {
            DType::F32 => self.backward_typed::<f32>(d, q, k, v, grad)?,
            DType::F64 => self.backward_typed::<f64>(d, q, k, v, grad)?,
            dt => candle_core::bail!("window-attention runs in f32 or f64, not {dt:?}"),
        };
        Ok((Some(a), Some(b), Some(c)))
    }
}

/// Windowed attention of queries at positions 0..t over keys at the same positions (the training
/// layout), through [`WindowAttention`]: q (b, n, t, hd), k, v (b, nkv, t, hd) -> (b, n, t, hd).
pub fn window_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sinks: usize,
    window: usize,
) -> anyhow::Result<Tensor> {
    anyhow::ensure!(
        window >= 1,
        "attention window 0: a query must see its own key"
    );
    let hd = q.dim(3)?;
    let op = WindowAttention {
        sinks,
        window,
        scale: 1.0 / (hd as f64).sqrt(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::window::{windowed_attention, KeyLayout};
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
        // A small portable generator: the test must not depend on a crate's stream.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let len: usize = shape.iter().product();
        let v: Vec<f64> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The kernel against the graph of `windowed_attention` (blocked matmuls, mask, softmax):
    /// outputs and the gradients of q, k and v, in f64 (to rounding) and f32, for windows shorter
    /// and longer than the sequence, with and without sinks.
    #[test]
    fn matches_graph_windowed_attention_with_gradients() -> anyhow::Result<()> {
        let (b, n, nkv, t, hd) = (2, 6, 2, 150, 8);
        for (sinks, window) in [(4, 32), (0, 5), (3, 1), (4, 400)] {
            for dtype in [DType::F64, DType::F32] {
                let q = Var::from_tensor(&(rand(&[b, n, t, hd], 1)? * 2.0)?.to_dtype(dtype)?)?;
                let k = Var::from_tensor(&(rand(&[b, nkv, t, hd], 2)? * 2.0)?.to_dtype(dtype)?)?;
                let v = Var::from_tensor(&rand(&[b, nkv, t, hd], 3)?.to_dtype(dtype)?)?;
                let w = rand(&[b, n, t, hd], 4)?.to_dtype(dtype)?;
                let run = |fused: bool| -> anyhow::Result<(Tensor, Vec<Tensor>)> {
                    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                    let o = if fused {
                        window_attention_fused(qt, kt, vt, sinks, window)?
                    } else {
                        windowed_attention(qt, kt, vt, KeyLayout::default(), sinks, window, true)?
                    };
                    let g = (&o * &w)?.sum_all()?.backward()?;
                    let gs = [&q, &k, &v]
                        .iter()
                        .map(|x| g.get(x.as_tensor()).cloned())
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| anyhow::anyhow!("missing gradient"))?;
                    Ok((o, gs))
                };
                let (o_ref, g_ref) = run(false)?;
                let (o, g) = run(true)?;
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
                let rel = |a: &Tensor, b: &Tensor| -> anyhow::Result<f64> {
                    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
                    let m = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    Ok(m / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300))
                };
                let r = rel(&o, &o_ref)?;
                println!("sinks {sinks} window {window} {dtype:?}: output rel {r:.2e}");
                assert!(r <= tol, "output: {r:e}");
                for (name, (a, b)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g_ref)) {
                    let r = rel(a, b)?;
                    println!("  d/d{name}: rel {r:.2e}");
                    assert!(r <= tol, "sinks {sinks} window {window} d/d{name}: {r:e}");
                }
            }
        }
        Ok(())
    }
}
