//! The optimiser of `train`: AdamW with decoupled weight decay, gradient clipping by global norm,
//! and the learning-rate schedule (linear warmup, then cosine decay to a floor).
//!
//! Written here rather than taken from `candle_nn::AdamW` because exact resume needs the moment
//! estimates and the step count as tensors that can be saved and restored bit for bit, and the
//! weight decay has to skip some parameters (A_log, D, biases, norms).
//!
//! Update, as PyTorch's `torch.optim.AdamW` (Loshchilov & Hutter 2019, "Decoupled Weight Decay
//! Regularization", arXiv:1711.05101, algorithm 2), for step t = 1, 2, ...:
//!   p <- p (1 - lr wd)                        (only for parameters with decay)
//!   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//!   p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! Every operation runs in the parameter's dtype on candle's CPU kernels, which are deterministic
//! for a fixed thread count: the same inputs give the same bits.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// AdamW hyper-parameters (the learning rate comes from the schedule at every step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trained tensor.
pub struct ParamSlot {
    /// Checkpoint name (`model.layers.3.mixer.A_log`).
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (see [`decays`]).
    pub decay: bool,
    /// This tensor's learning rate as a multiple of the step's (1 unless set).
    pub lr_scale: f64,
}

/// Weight decay applies to projection matrices only: not to biases, norms, A_log, D, Δ's bias or
/// the conv kernel (Mamba's `_no_weight_decay` covers A_log and D; the rest follows common practice
/// for transformers).
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.ends_with("conv.weight")
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub slots: Vec<ParamSlot>,
    /// First and second moment estimates, one per slot.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (t of the bias correction).
    t: u64,
}

impl AdamW {
    /// Zero moments for `params` (checkpoint name, variable).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (name, var) in params {
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
            let decay = decays(&name, var.as_tensor().rank());
            slots.push(ParamSlot {
                name,
                var,
                decay,
                lr_scale: 1.0,
            });
        }
        Ok(AdamW {
            cfg,
            slots,
            m,
            v,
            t: 0,
        })
    }

    /// Per-tensor learning-rate multipliers, by checkpoint name.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update with `grads` (one per slot, in slot order) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                "optimizer step with {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (slot, g)) in self.slots.iter().zip(grads).enumerate() {
            let lr = lr * slot.lr_scale;
            // Detached: the update must not extend the autograd graph of the variable.
            let p = slot.var.as_tensor().detach();
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let p = if slot.decay && self.cfg.weight_decay != 0.0 {
                (p * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                p
            };
            let p = (p - (update * lr)?)?;
            slot.var
                .set(&p)
                .with_context(|| format!("updating {}", slot.name))?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments under `exp_avg.{name}` / `exp_avg_sq.{name}` (PyTorch's state names), for
    /// saving beside the model.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for (i, s) in self.slots.iter().enumerate() {
            out.push((format!("exp_avg.{}", s.name), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{}", s.name), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count `t`, checking
    /// that every parameter has both moments of its shape and that nothing else is in the file.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, t: u64) -> Result<()> {
        let dtype = self.slots.first().map(|s| s.var.as_tensor().dtype());
        for (i, s) in self.slots.iter().enumerate() {
            for (kind, dst) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{kind}.{}", s.name);
                let src = tensors
                    .remove(&key)
                    .with_context(|| format!("optimizer state has no {key}"))?;
                if src.dims() != s.var.as_tensor().dims() {
                    bail!(
                        "optimizer state {key} has shape {:?}, the parameter has {:?}",
                        src.dims(),
                        s.var.as_tensor().dims()
                    );
                }
                if Some(src.dtype()) != dtype {
                    bail!(
                        "optimizer state {key} has dtype {:?}, the parameters {:?}",
                        src.dtype(),
                        dtype
                    );
                }
                *dst = src;
            }
        }
        if !tensors.is_empty() {
            let mut extra: Vec<&String> = tensors.keys().collect();
            extra.sort();
            bail!(
                "optimizer state holds {} tensor(s) for parameters that are not trained: {}",
                extra.len(),
                extra
                    .iter()
                    .take(4)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.t = t;
        Ok(())
    }
}

/// Euclidean norm of all `grads` together (accumulated in f64, in order: deterministic).
pub fn global_norm(grads: &[&Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm` (no-op when `max_norm` <= 0 or
/// the norm is below it), as `torch.nn.utils.clip_grad_norm_`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(&grads.iter().collect::<Vec<_>>())?;
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Linear warmup over `warmup` steps to `peak`, then cosine decay to `peak * min_ratio` at step
/// `horizon` (and flat after it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub min_ratio: f64,
    pub warmup: u64,
    pub horizon: u64,
}

impl LrSchedule {
    /// Learning rate of update `step` (0-based: the first update is step 0).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.horizon.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + 0.5 * (self.peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule {
            peak: 1e-3,
            min_ratio: 0.1,
            warmup: 4,
            horizon: 14,
        };
        assert!((s.lr(0) - 2.5e-4).abs() < 1e-12);
        assert!((s.lr(3) - 1e-3).abs() < 1e-12);
        assert!((s.lr(4) - 1e-3).abs() < 1e-12);
        assert!((s.lr(9) - 5.5e-4).abs() < 1e-12); // half way: (peak + floor) / 2
        assert!((s.lr(14) - 1e-4).abs() < 1e-12);
        assert!((s.lr(100) - 1e-4).abs() < 1e-12);
        let w0 = LrSchedule { warmup: 0, ..s };
        assert!((w0.lr(0) - 1e-3).abs() < 1e-12);
    }

    /// A tensor with an lr scale of 0.25 moves a quarter as far as the same tensor at scale 1
    /// (one step, same gradient).
    #[test]
    fn lr_scale_scales_the_update() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = Tensor::new(&[1.0f64, -2.0, 0.5], &dev)?;
        let g = Tensor::new(&[0.3f64, -0.1, 2.0], &dev)?;
        let (a, b) = (Var::from_tensor(&p0)?, Var::from_tensor(&p0)?);
        let mut opt = AdamW::new(
            vec![
                ("full.bias".into(), a.clone()),
                ("base.bias".into(), b.clone()),
            ],
            AdamWConfig::default(),
        )?;
        opt.set_lr_scales(|n| if n.starts_with("base") { 0.25 } else { 1.0 });
        opt.step(&[g.clone(), g], 0.01)?;
        let da = (a.as_tensor() - &p0)?.to_vec1::<f64>()?;
        let db = (b.as_tensor() - &p0)?.to_vec1::<f64>()?;
        for (x, y) in da.iter().zip(&db) {
            assert!(x.abs() > 1e-3, "{x}");
            assert!((y - x * 0.25).abs() < 1e-12, "{y} vs {x} / 4");
        }
        Ok(())
    }

    /// Two steps on a decayed matrix and an undecayed bias against the update rule of the module
    /// doc (PyTorch's AdamW) evaluated in plain f64 beside it.
    #[test]
    fn adamw_matches_the_update_rule() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = [1.0f64, -2.0, 0.5, 3.0];
        let b0 = [0.25f64, -1.0];
        let p = Var::from_tensor(&Tensor::from_slice(&p0, (2, 2), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_slice(&b0, 2, &dev)?)?;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(
            vec![("w".into(), p.clone()), ("bias".into(), b.clone())],
            cfg,
        )?;
        assert!(opt.slots[0].decay && !opt.slots[1].decay);
        let gs = [[0.1f64, -0.2, 0.3, 0.0], [-0.5, 0.25, 1.0, 2.0]];
        let gb = [1.0f64, -3.0];
        let lr = 0.01;
        // Reference in plain f64.
        let (mut rp, mut rm, mut rv) = (p0.to_vec(), [0f64; 4], [0f64; 4]);
        let (mut rb, mut bm, mut bv) = (b0.to_vec(), [0f64; 2], [0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let t = (t + 1) as i32;
            let (c1, c2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.95f64.powi(t));
            for i in 0..4 {
                rp[i] *= 1.0 - lr * 0.1;
                rm[i] = 0.9 * rm[i] + 0.1 * g[i];
                rv[i] = 0.95 * rv[i] + 0.05 * g[i] * g[i];
                rp[i] -= lr * (rm[i] / c1) / ((rv[i] / c2).sqrt() + 1e-8);
            }
            for i in 0..2 {
                bm[i] = 0.9 * bm[i] + 0.1 * gb[i];
                bv[i] = 0.95 * bv[i] + 0.05 * gb[i] * gb[i];
                rb[i] -= lr * (bm[i] / c1) / ((bv[i] / c2).sqrt() + 1e-8);
            }
            let grads = [
                Tensor::from_slice(g, (2, 2), &dev)?,
                Tensor::from_slice(&gb, 2, &dev)?,
            ];
            opt.step(&grads, lr)?;
        }
        let got = p.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for (a, e) in got.iter().zip(&rp) {
            assert!((a - e).abs() < 1e-12, "{a} vs {e}");
        }
        let got = b.as_tensor().to_vec1::<f64>()?;
        for (a, e) in got.iter().zip(&rb) {
            assert!((a - e).abs() < 1e-12, "{a} vs {e}");
        }
        // State round trip, then a wrong shape is refused with the numbers.
        let st: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut opt2 = AdamW::new(
            vec![("w".into(), p.clone()), ("bias".into(), b.clone())],
            cfg,
        )?;
        opt2.load_state(st.clone(), opt.steps())?;
        assert_eq!(opt2.steps(), 2);
        let mut bad = st;
        bad.insert("exp_avg.bias".into(), Tensor::zeros(3, DType::F64, &dev)?);
        let e = opt2.load_state(bad, 2).unwrap_err().to_string();
        assert!(e.contains("exp_avg.bias") && e.contains("[3]"), "{e}");
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3f32, 0.0], &dev)?,
            Tensor::new(&[[4f32]], &dev)?,
        ];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        let after = global_norm(&g.iter().collect::<Vec<_>>())?;
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let n2 = clip_grad_norm(&mut g, 10.0)?;
        assert!((n2 - after).abs() < 1e-9);
        Ok(())
    }
}
