//! The losses: normalised MSE of alignment, KL(teacher ‖ student) plus cross-entropy in one pass
//! over the vocabulary (`DistillLossOp`, a custom op with a hand-written backward), and the
//! hidden-state term of distillation.

use crate::model::llama::Model;
use crate::model::options::ForwardOptions;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

/// ||y - y*||² / ||y*||² as a scalar tensor.
pub(super) fn normalised_mse(y: &Tensor, target: &Tensor) -> Result<Tensor> {
    let num = (y - target)?.sqr()?.sum_all()?;
    let den = target.sqr()?.sum_all()?;
    Ok((num / den)?)
}

/// Teacher logits (b, t, v) on the fast inference path (no graph).
pub(super) fn teacher_logits(teacher: &Model, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let mut cache = teacher.new_cache(b, t);
    let h = teacher.forward_hidden(ids, &mut cache, &ForwardOptions::default(), None)?;
    Ok(teacher.logits(&h)?.detach())
}

/// KL(teacher ‖ student) and the student's cross-entropy from both models' logits in one pass
/// over the vocabulary, with a hand-written backward. Composed from candle ops the same losses
/// allocate about ten (rows x v) tensors forward and backward (50 MB each at 256 tokens of a 49K
/// vocabulary) and cost more than the student's backward through all its layers.
///
/// Per row r (one position): ls = s - logsumexp(s), lt = t - logsumexp(t), p = exp(lt),
/// q = exp(ls); KL_r = sum_j p_j (lt_j - ls_j); CE_r = -ls_{target}. Output [sum_r KL_r / n_kl,
/// sum_{r with a target} CE_r / n_ce]. Gradients with respect to s: d KL / d s_j = (q_j P - p_j)
/// / n_kl with P = sum_j p_j (1 up to rounding), d CE / d s_j = (q_j - [j = target]) / n_ce.
/// Sums run in f64 in row order; rows are processed in parallel, each by one thread, so the
/// result does not depend on the thread count.
pub(super) struct DistillLossOp {
    /// Target token of each row, or None (the last position of a window has none).
    pub(super) targets: Vec<Option<u32>>,
    /// Per-row weights of both terms (None: all 1). `n_kl` and `n_ce` are then the sums of the
    /// weights over all rows and over the rows with a target: a weighted mean.
    pub(super) weights: Option<Vec<f64>>,
    pub(super) n_kl: f64,
    pub(super) n_ce: f64,
    /// Per row (logsumexp(s), logsumexp(t), P), from the forward pass for the backward.
    pub(super) stash: std::sync::Mutex<Vec<(f64, f64, f64)>>,
}

/// exp in the working precision: f32 inputs use f32's exp (the sums stay f64).
pub(super) fn exp_in(x: f64, single: bool) -> f64 {
    if single {
        (x as f32).exp() as f64
    } else {
        x.exp()
    }
}

/// Contiguous rows of a (rows, v) f32 or f64 storage, as f64 closures' input.
pub(super) fn float_rows<'a>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<(FloatSlice<'a>, usize)> {
    let (_, v) = l.shape().dims2()?;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("distill-loss needs contiguous inputs");
    };
    let sl = match s {
        CpuStorage::F32(x) => FloatSlice::F32(&x[start..end]),
        CpuStorage::F64(x) => FloatSlice::F64(&x[start..end]),
        _ => candle_core::bail!("distill-loss takes f32 or f64 logits"),
    };
    Ok((sl, v))
}

#[derive(Clone, Copy)]
pub(super) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl FloatSlice<'_> {
    fn row(&self, r: usize, v: usize) -> Vec<f64> {
        match self {
            FloatSlice::F32(x) => x[r * v..(r + 1) * v].iter().map(|&a| a as f64).collect(),
            FloatSlice::F64(x) => x[r * v..(r + 1) * v].to_vec(),
        }
    }
}

pub(super) fn logsumexp(x: &[f64], single: bool) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + x.iter().map(|&a| exp_in(a - m, single)).sum::<f64>().ln()
}

impl CustomOp2 for DistillLossOp {
    fn name(&self) -> &'static str {
        "distill-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (st, v) = float_rows(s1, l1)?;
        let (tt, v2) = float_rows(s2, l2)?;
        let rows = l1.shape().dims2()?.0;
        if v != v2
            || l2.shape().dims2()?.0 != rows
            || self.targets.len() != rows
            || self.weights.as_ref().is_some_and(|w| w.len() != rows)
        {
            candle_core::bail!(
                "distill-loss: student {:?}, teacher {:?}, {} targets",
                l1.shape(),
                l2.shape(),
                self.targets.len()
            );
        }
        let single = matches!(st, FloatSlice::F32(_));
        let per_row: Vec<(f64, f64, (f64, f64, f64))> = (0..rows)
            .into_par_iter()
            .map(|r| {
                let (s, t) = (st.row(r, v), tt.row(r, v));
                let (lse_s, lse_t) = (logsumexp(&s, single), logsumexp(&t, single));
                let (mut kl, mut mass) = (0f64, 0f64);
                for (a, b) in s.iter().zip(&t) {
                    let lt = b - lse_t;
                    let p = exp_in(lt, single);
                    kl += p * (lt - (a - lse_s));
                    mass += p;
                }
                let ce = match self.targets[r] {
                    Some(j) => lse_s - s[j as usize],
                    None => 0.0,
                };
                let w = self.weights.as_ref().map_or(1.0, |w| w[r]);
                (w * kl, w * ce, (lse_s, lse_t, mass))
            })
            .collect();
        let kl = per_row.iter().map(|x| x.0).sum::<f64>() / self.n_kl;
        let ce = per_row.iter().map(|x| x.1).sum::<f64>() / self.n_ce.max(1.0);
        *self.stash.lock().expect("stash lock") = per_row.into_iter().map(|x| x.2).collect();
        let out = if single {
            CpuStorage::F32(vec![kl as f32, ce as f32])
        } else {
            CpuStorage::F64(vec![kl, ce])
        };
        Ok((out, Shape::from(2)))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let g = grad.to_dtype(DType::F64)?.to_vec1::<f64>()?; // [d/dKL, d/dCE]
        let (g_kl, g_ce) = (g[0] / self.n_kl, g[1] / self.n_ce.max(1.0));
        let stash = self.stash.lock().expect("stash lock").clone();
        let (rows, v) = student.dims2()?;
        let single = student.dtype() == DType::F32;
        let (ss, sl) = student.storage_and_layout();
        let (ts, tl) = teacher.storage_and_layout();
        let (Storage::Cpu(sc), Storage::Cpu(tc)) = (&*ss, &*ts) else {
            candle_core::bail!("distill-loss runs on the CPU only");
        };
        let (st, _) = float_rows(sc, sl)?;
        let (tt, _) = float_rows(tc, tl)?;
        let mut out = vec![0f64; rows * v];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            let (lse_s, lse_t, mass) = stash[r];
            let (s, t) = (st.row(r, v), tt.row(r, v));
            let w = self.weights.as_ref().map_or(1.0, |w| w[r]);
            let (g_kl, g_ce) = (
                g_kl * w,
                if self.targets[r].is_some() {
                    g_ce * w
                } else {
                    0.0
                },
            );
            for j in 0..v {
                let q = exp_in(s[j] - lse_s, single);
                let p = exp_in(t[j] - lse_t, single);
                o[j] = g_kl * (q * mass - p) + g_ce * q;
            }
            if let Some(j) = self.targets[r] {
                o[j as usize] -= g_ce;
            }
        });
        let gs = Tensor::from_vec(out, (rows, v), student.device())?.to_dtype(student.dtype())?;
        Ok((Some(gs), None))
    }
}

/// Distillation losses of student logits (b, t, v) against the teacher's logits (same shape):
/// KL(teacher ‖ student) summed over the vocabulary and averaged over the b*t positions, and the
/// student's cross-entropy on the next tokens of `ids` (b*(t-1) predictions), as scalar tensors
/// that backpropagate into the student's logits (see `DistillLossOp`).
pub fn distill_losses(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    ids: &Tensor,
) -> Result<(Tensor, Tensor)> {
    distill_losses_weighted(student_logits, teacher_logits, ids, None)
}

/// [`distill_losses`] with a weight per position (b*t, row-major; `None`: all 1): both terms
/// become weighted means, sum_r w_r KL_r / sum_r w_r and likewise for the cross-entropy over the
/// positions that have a next token. Used to weigh the answer tokens of retrieval windows.
pub fn distill_losses_weighted(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    ids: &Tensor,
    weights: Option<&[f64]>,
) -> Result<(Tensor, Tensor)> {
    let (b, t, v) = student_logits.dims3()?;
    let ids_v: Vec<Vec<u32>> = ids.to_vec2()?;
    let targets: Vec<Option<u32>> = ids_v
        .iter()
        .flat_map(|w| (0..t).map(move |i| w.get(i + 1).copied()))
        .collect();
    let (n_kl, n_ce) = match weights {
        None => ((b * t) as f64, (b * (t - 1)) as f64),
        Some(w) => {
            anyhow::ensure!(
                w.len() == b * t
                    && w.iter().all(|x| x.is_finite() && *x >= 0.0)
                    && w.iter().sum::<f64>() > 0.0,
                "distillation weights: {} values for {} positions, or a negative / non-finite \
                 one, or all zero",
                w.len(),
                b * t
            );
            let with_target: f64 = targets
                .iter()
                .zip(w)
                .filter(|(tg, _)| tg.is_some())
                .map(|(_, x)| x)
                .sum();
            (w.iter().sum(), with_target)
        }
    };
    let op = DistillLossOp {
        targets,
        weights: weights.map(<[f64]>::to_vec),
        n_kl,
        n_ce,
        stash: std::sync::Mutex::new(Vec::new()),
    };
    let s2 = student_logits.reshape((b * t, v))?.contiguous()?; // (b*t, v)
    let t2 = teacher_logits
        .to_dtype(student_logits.dtype())?
        .reshape((b * t, v))?
        .contiguous()?
        .detach();
    let out = s2.apply_op2(&t2, op)?; // (2): [KL, CE]
    Ok((
        out.narrow(0, 0, 1)?.squeeze(0)?,
        out.narrow(0, 1, 1)?.squeeze(0)?,
    ))
}

/// Mean normalised MSE between the student's and the teacher's normalised layer inputs, from the
/// layer after the first converted one to the final norm's output (earlier layers see identical
/// inputs in both models). Matching the residual stream at every depth gives each mixer a direct
/// signal besides the one that reaches it through the logits, in the spirit of the hidden-state
/// stage of MOHAWK (Bick et al. 2024, "Transformers to SSMs"), except that here each model runs
/// on its own inputs end to end instead of the student's block on the teacher's input.
pub fn hidden_state_loss(
    student: &Model,
    s_states: &[Tensor],
    s_final: &Tensor,
    t_states: &[Tensor],
    t_final: &Tensor,
) -> Result<Tensor> {
    let start = student
        .layers
        .iter()
        .position(|l| l.mixer.is_some())
        .map_or(0, |f| f + 1);
    let mut terms = vec![normalised_mse(
        s_final,
        &t_final.to_dtype(s_final.dtype())?,
    )?];
    for (s, t) in s_states.iter().zip(t_states).skip(start) {
        terms.push(normalised_mse(s, &t.to_dtype(s.dtype())?)?);
    }
    let n = terms.len() as f64;
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / n)?)
}
