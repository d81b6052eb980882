//! One micro-batch of each stage (teacher activations, forward, loss, backward, gradients in
//! parameter order) and the held-out evaluation.

use super::*;
use crate::model::llama::Model;
use crate::model::options::{AttentionImpl, AttnObservation, ForwardOptions};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// A converted layer of the student: its index and the base model's query heads its mixer
/// replaced, in mixer output order.
#[derive(Debug, Clone)]
pub(super) struct Converted {
    pub(super) layer: usize,
    pub(super) heads: Tensor, // (n) u32
    pub(super) n: usize,
}

pub(super) fn converted_layers(student: &Model) -> Result<Vec<Converted>> {
    let mut out = Vec::new();
    for (i, l) in student.layers.iter().enumerate() {
        if l.mixer.is_some() {
            let h: Vec<u32> = l.split.mamba_heads.iter().map(|&h| h as u32).collect();
            out.push(Converted {
                layer: i,
                heads: Tensor::new(h.as_slice(), &student.device)?,
                n: h.len(),
            });
        }
    }
    ensure!(
        !out.is_empty(),
        "the student has no Mamba mixers: nothing to align"
    );
    Ok(out)
}

/// The teacher's eager forward over `ids` (b, t): per converted layer, its normalised input
/// (b, t, d) and the replaced heads' outputs before o_proj (b, t, n*hd), in `conv` order.
pub(super) fn teacher_activations(
    teacher: &Model,
    conv: &[Converted],
    ids: &Tensor,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (b, t) = ids.dims2()?;
    let hd = teacher.cfg.head_dim;
    let mut slot: Vec<Option<usize>> = vec![None; teacher.layers.len()];
    for (i, c) in conv.iter().enumerate() {
        slot[c.layer] = Some(i);
    }
    let mut out: Vec<Option<(Tensor, Tensor)>> = vec![None; conv.len()];
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    {
        let mut observer = |o: &AttnObservation| -> Result<()> {
            if let Some(i) = slot[o.layer] {
                let c = &conv[i];
                let y = o
                    .heads_out
                    .index_select(&c.heads, 1)? // (b, n, t, hd)
                    .transpose(1, 2)?
                    .reshape((b, t, c.n * hd))?; // (b, t, n*hd)
                out[i] = Some((o.input.detach(), y.detach()));
            }
            Ok(())
        };
        let mut cache = teacher.new_cache(b, t);
        teacher.forward_hidden(ids, &mut cache, &opts, Some(&mut observer))?;
    }
    out.into_iter()
        .zip(conv)
        .map(|(o, c)| {
            o.with_context(|| format!("the teacher's layer {} was not observed", c.layer))
        })
        .collect()
}

pub(super) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// One micro-batch's losses and gradients (in slot order).
pub(super) struct MicroResult {
    pub(super) loss: f64,
    /// align: per converted layer; distill: [kl, ce].
    pub(super) parts: Vec<f64>,
    pub(super) grads: Vec<Tensor>,
}

pub(super) fn grads_in_order(
    store: &candle_core::backprop::GradStore,
    vars: &[(String, Var)],
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(_, v)| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            // A tensor the loss does not depend on (cannot happen for mixers): zero gradient.
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// Stage 1 on one micro-batch: every converted layer's mixer against the teacher's heads.
pub(super) fn align_micro(
    teacher: &Model,
    student: &Model,
    conv: &[Converted],
    ids: &Tensor,
    vars: Option<&[(String, Var)]>,
) -> Result<MicroResult> {
    let acts = teacher_activations(teacher, conv, ids)?;
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: true,
    };
    let mut total: Option<Tensor> = None;
    let mut parts = Vec::with_capacity(conv.len());
    // Rotary tables for the windowed heads, built once per micro-batch (same length every layer).
    let mut rope_tables: Option<(Tensor, Tensor)> = None;
    for (c, (u, target)) in conv.iter().zip(&acts) {
        let mixer = student.layers[c.layer]
            .mixer
            .as_ref()
            .context("converted layer without mixer")?;
        let u = u.to_dtype(mixer.x_proj.dtype())?;
        let (y, _) = mixer.forward_seq(&u, None, &opts)?;
        // With windowed heads beside the mixer, the two together stand in for the heads.
        let y = match &student.layers[c.layer].local {
            Some(la) => {
                if rope_tables.is_none() {
                    let (cos, sin) = student.rope.tables(0, u.dim(1)?, &student.device)?;
                    rope_tables = Some((cos.to_dtype(u.dtype())?, sin.to_dtype(u.dtype())?));
                }
                let (cos, sin) = rope_tables.as_ref().expect("built above");
                (y + local_train(la, &student.rope, &u, (cos, sin), &opts)?)?
            }
            None => y,
        };
        let l = normalised_mse(&y, &target.to_dtype(y.dtype())?)?;
        parts.push(scalar(&l)?);
        total = Some(match total {
            Some(s) => (s + l)?,
            None => l,
        });
    }
    let total = total.context("no converted layer")?;
    let loss = parts.iter().sum::<f64>() / parts.len() as f64;
    let grads = match vars {
        Some(v) if loss.is_finite() => grads_in_order(&total.backward()?, v)?,
        _ => Vec::new(),
    };
    Ok(MicroResult { loss, parts, grads })
}

/// Stage 2 on one micro-batch: parts [KL, CE, hidden-state NMSE (0 when its weight is 0)].
pub(super) fn distill_micro(
    teacher: &Model,
    student: &Model,
    ids: &Tensor,
    ce_weight: f64,
    hidden_weight: f64,
    weights: Option<&[f64]>,
    vars: Option<&[(String, Var)]>,
) -> Result<MicroResult> {
    let with_hidden = hidden_weight > 0.0;
    let (tl, t_hidden) = if with_hidden {
        // The teacher on the same eager path as the student, keeping its layer inputs.
        let (h, states) = forward_train_states(teacher, ids, true)?;
        let states: Vec<Tensor> = states.iter().map(|s| s.detach()).collect();
        (teacher.logits(&h)?.detach(), Some((h.detach(), states)))
    } else {
        (teacher_logits(teacher, ids)?, None)
    };
    let (h, s_states) = forward_train_states(student, ids, with_hidden)?;
    let logits = logits_train(student, &h)?;
    let (kl, ce) = distill_losses_weighted(&logits, &tl, ids, weights)?;
    let hidden = t_hidden
        .map(|(t_final, t_states)| hidden_state_loss(student, &s_states, &h, &t_states, &t_final))
        .transpose()?;
    let (klv, cev) = (scalar(&kl)?, scalar(&ce)?);
    let hv = hidden.as_ref().map(scalar).transpose()?.unwrap_or(0.0);
    let loss = klv + ce_weight * cev + hidden_weight * hv;
    let grads = match vars {
        Some(v) if loss.is_finite() => {
            let mut total = kl;
            if ce_weight > 0.0 {
                total = (total + (ce * ce_weight)?)?;
            }
            if let Some(x) = hidden {
                total = (total + (x * hidden_weight)?)?;
            }
            grads_in_order(&total.backward()?, v)?
        }
        _ => Vec::new(),
    };
    Ok(MicroResult {
        loss,
        parts: vec![klv, cev, hv],
        grads,
    })
}

/// Held-out figures of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// The stage's loss (align: mean normalised MSE over layers; distill: KL + ce_weight x CE).
    pub loss: f64,
    /// distill: KL(teacher ‖ student) per token.
    pub kl: Option<f64>,
    /// distill: the student's cross-entropy (nats per token; exp gives perplexity).
    pub ce: Option<f64>,
    /// distill with a hidden-state weight: the mean normalised MSE of the layer inputs.
    #[serde(default)]
    pub hidden: Option<f64>,
}

/// The stage's loss on fixed held-out windows (no gradients).
pub fn evaluate(
    stage: Stage,
    teacher: &Model,
    student: &Model,
    windows: &[&[u32]],
    batch: usize,
    ce_weight: f64,
    hidden_weight: f64,
) -> Result<EvalResult> {
    let conv = match stage {
        Stage::Align => converted_layers(student)?,
        Stage::Distill => Vec::new(),
    };
    let (mut loss, mut kl, mut ce, mut hid, mut n) = (0f64, 0f64, 0f64, 0f64, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        let ids = ids_tensor(chunk, &student.device)?;
        let r = match stage {
            Stage::Align => align_micro(teacher, student, &conv, &ids, None)?,
            Stage::Distill => {
                distill_micro(teacher, student, &ids, ce_weight, hidden_weight, None, None)?
            }
        };
        let w = chunk.len() as f64;
        loss += r.loss * w;
        if stage == Stage::Distill {
            kl += r.parts[0] * w;
            ce += r.parts[1] * w;
            hid += r.parts[2] * w;
        }
        n += chunk.len();
    }
    let n = n as f64;
    Ok(EvalResult {
        loss: loss / n,
        kl: (stage == Stage::Distill).then_some(kl / n),
        ce: (stage == Stage::Distill).then_some(ce / n),
        hidden: (stage == Stage::Distill && hidden_weight > 0.0).then_some(hid / n),
    })
}
