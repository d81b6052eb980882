//! Where the time of a distillation step goes, by part of the student (issue 19): each part of
//! every layer is run on its own over one window's activations, forward and then backward of a
//! random projection of its output, and the times are summed over the layers that have the part.
//! The input is a fresh `Var`, so the backward computes the input's gradient as the real step
//! does (frozen projections through `FrozenMatmul`, trained tensors with their own gradients).
//! `examples/train_profile.rs` prints the table.

use super::*;
use crate::model::llama::Model;
use crate::model::options::{AttentionImpl, ForwardOptions};
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use std::time::Instant;

/// Seconds of one part, summed over the layers that have it (median over the repeats).
#[derive(Debug, Clone)]
pub struct PartTime {
    pub name: &'static str,
    /// How many layers have the part (1 for the head and loss).
    pub count: usize,
    pub forward: f64,
    pub backward: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f(x)` forward and the backward of `sum(f(x) * r)` for a fresh input `x` (b, t, d).
fn time_part(
    x0: &Tensor,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    reps: usize,
) -> Result<(f64, f64)> {
    let (mut fw, mut bw) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let x = Var::from_tensor(x0)?;
        let t0 = Instant::now();
        let y = f(x.as_tensor())?;
        let _ = y.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t1 = Instant::now();
        let r = y.ones_like()?;
        let loss = (y * r)?.sum_all()?;
        let _g = loss.backward()?;
        let t2 = Instant::now();
        fw.push((t1 - t0).as_secs_f64());
        bw.push((t2 - t1).as_secs_f64());
    }
    Ok((median(fw), median(bw)))
}

/// The per-part profile of `student` (made trainable) on `ids` (1, t): the parts of every layer
/// on the layer's real input (the student's own activations), then the LM head with the loss
/// against `teacher`'s logits.
pub fn profile_parts(
    teacher: &Model,
    student: &Model,
    ids: &Tensor,
    reps: usize,
) -> Result<Vec<PartTime>> {
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: true,
    };
    let t = ids.dim(1)?;
    let dtype = student.embed_tokens.dtype();
    let (_, states) = forward_train_states(student, ids, true)?;
    let (cos, sin) = student.rope.tables(0, t, &student.device)?;
    let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
    let mask = causal_mask(t, dtype, &student.device)?;
    let names = [
        "rms norms (2 per layer)",
        "kept attention (q/k/v, rope, softmax)",
        "mixer (projections, conv, scan, gate)",
        "windowed heads beside the mixer",
        "o_proj",
        "MLP",
    ];
    let mut acc: Vec<PartTime> = names
        .iter()
        .map(|&name| PartTime {
            name,
            count: 0,
            forward: 0.0,
            backward: 0.0,
        })
        .collect();
    let mut add = |i: usize, (f, b): (f64, f64)| {
        acc[i].count += 1;
        acc[i].forward += f;
        acc[i].backward += b;
    };
    for (layer, h) in student.layers.iter().zip(&states) {
        let h = h.detach();
        add(
            0,
            time_part(
                &h,
                &|x| {
                    let a = layer.input_layernorm.forward(x, &opts)?;
                    Ok(layer.post_attention_layernorm.forward(&a, &opts)?)
                },
                reps,
            )?,
        );
        let mut width = 0;
        if let Some(a) = &layer.self_attn {
            width += a.n_heads * a.head_dim;
            add(
                1,
                time_part(
                    &h,
                    &|x| attention_train(a, &student.rope, x, (&cos, &sin), &mask, &opts),
                    reps,
                )?,
            );
        }
        if let Some(mx) = &layer.mixer {
            add(
                2,
                time_part(&h, &|x| Ok(mx.forward_seq(x, None, &opts)?.0), reps)?,
            );
            if let Some(la) = &layer.local {
                add(
                    3,
                    time_part(
                        &h,
                        &|x| local_train(la, &student.rope, x, (&cos, &sin), &opts),
                        reps,
                    )?,
                );
            }
        }
        width += layer.split.mamba_heads.len() * student.cfg.head_dim;
        let o = o_proj_in_run_order(layer, student.cfg.head_dim)?;
        let o_in = Tensor::randn(0f32, 1.0, (1, t, width), &student.device)?.to_dtype(dtype)?;
        add(4, time_part(&o_in, &|x| linear_train(&o, x), reps)?);
        let mlp = &layer.mlp;
        add(
            5,
            time_part(
                &h,
                &|x| {
                    let gate = linear_train(&mlp.gate_proj, x)?.silu()?;
                    let up = linear_train(&mlp.up_proj, x)?;
                    linear_train(&mlp.down_proj, &(gate * up)?)
                },
                reps,
            )?,
        );
    }
    let tl = teacher_logits(teacher, ids)?;
    let last = student
        .norm
        .forward(&states.last().expect("at least one layer").detach(), &opts)?;
    let (f, b) = time_part(
        &last,
        &|x| {
            let logits = logits_train(student, x)?;
            let (kl, ce) = distill_losses(&logits, &tl, ids)?;
            Ok((kl + (ce * 0.5)?)?)
        },
        reps,
    )?;
    acc.push(PartTime {
        name: "LM head + KL/CE loss",
        count: 1,
        forward: f,
        backward: b,
    });
    Ok(acc.into_iter().filter(|p| p.count > 0).collect())
}
