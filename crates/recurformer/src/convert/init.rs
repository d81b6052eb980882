//! Conversion (DESIGN.md, "Initialisation from the replaced heads"): a base model and a plan make a
//! RecurFormer. Kept heads keep their q/k/v rows; in each layer with replaced groups one Mamba mixer
//! takes over those groups' o_proj slots, initialised from their rows read as linear attention
//! (the default) or randomly (the ablation, `MambaMixer::init_random` in `model::mamba`).

use crate::convert::recency::RecencyReport;
use crate::model::attention::Attention;
use crate::model::hybrid::{
    Init, LocalWindow, MambaSettings, Provenance, RecurformerSection, FORMAT_VERSION,
};
use crate::model::layers::Linear;
use crate::model::llama::{DecoderLayer, HeadSplit, Model};
use crate::model::mamba::{MambaConfig, MambaMixer, ATTN_INIT_DT, SILU_ONE};
use crate::model::plan::{Plan, MIXER_CONV_KERNEL};
use crate::model::window::LocalAttention;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

/// Rows `heads[i]*hd .. +hd` of a (rows, cols) weight or (rows,) bias, in the order given.
fn rows_of(t: &Tensor, heads: &[usize], hd: usize) -> Result<Tensor> {
    let idx: Vec<u32> = heads
        .iter()
        .flat_map(|&h| (h * hd..(h + 1) * hd).map(|r| r as u32))
        .collect();
    Ok(t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)?)
}

fn linear_rows(l: &Linear, heads: &[usize], hd: usize) -> Result<Linear> {
    Ok(Linear::new(
        rows_of(&l.weight, heads, hd)?,
        l.bias.as_ref().map(|b| rows_of(b, heads, hd)).transpose()?,
    ))
}

/// What `convert` needs besides the base model.
pub struct ConvertOptions<'a> {
    pub plan: &'a Plan,
    pub recency: Option<&'a RecencyReport>,
    pub init: Init,
    pub seed: u64,
    pub provenance: Provenance,
    /// Windowed heads beside each mixer: the replaced heads keep their q/k/v over sinks + a
    /// recent window, and the mixer's output starts at zero (its gated norm's scale is 0), so the
    /// converted model is exactly the base model restricted to that window on the plan's groups
    /// (`Model::with_kv_window`); training then teaches the mixer what lies beyond the window.
    pub local: Option<LocalWindow>,
}

/// Turns a base model into a RecurFormer following `plan`: kept heads keep their q/k/v rows, each
/// layer with replaced groups gets one mixer initialised from those groups' rows (or randomly).
pub fn convert(base: &Model, o: &ConvertOptions) -> Result<Model> {
    let cfg = &base.cfg;
    if base.recurformer.is_some() {
        bail!("the model is already a RecurFormer; convert its base model instead");
    }
    o.plan.validate(cfg)?;
    if let Some(r) = o.recency {
        if (r.num_layers, r.num_attention_heads, r.num_key_value_heads)
            != (
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
            )
        {
            bail!(
                "recency report is for {} layers x {} heads ({} KV), the model has {} x {} ({})",
                r.num_layers,
                r.num_attention_heads,
                r.num_key_value_heads,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
    }
    if o.init == Init::Attention && o.recency.is_none() && !o.plan.is_empty() {
        bail!("--init attention needs the recency report (--recency): it sets each mixer's decay and output scale");
    }
    let settings = MambaSettings {
        state_size: cfg.head_dim,
        conv_kernel: MIXER_CONV_KERNEL,
        local: o.local,
    };
    if let Some(lw) = o.local {
        if lw.window == 0 {
            bail!("windowed heads with a window of 0 keys: a query must see at least its own");
        }
    }
    let hd = cfg.head_dim;
    let mut layers = Vec::with_capacity(base.layers.len());
    for (i, (bl, lp)) in base.layers.iter().zip(&o.plan.layers).enumerate() {
        let attn = bl
            .self_attn
            .as_ref()
            .context("base layer without attention")?;
        let split = HeadSplit {
            attention_heads: lp.attention_heads.clone(),
            mamba_heads: lp.mamba_heads.clone(),
        };
        let kept = if lp.attention_groups.is_empty() {
            None
        } else {
            Some(Attention {
                q_proj: linear_rows(&attn.q_proj, &lp.attention_heads, hd)?,
                k_proj: linear_rows(&attn.k_proj, &lp.attention_groups, hd)?,
                v_proj: linear_rows(&attn.v_proj, &lp.attention_groups, hd)?,
                n_heads: lp.attention_heads.len(),
                n_kv_heads: lp.attention_groups.len(),
                head_dim: hd,
                window: None,
            })
        };
        let mixer = if lp.mamba_groups.is_empty() {
            None
        } else {
            let mc = settings.mamba_config(cfg, lp.mamba_groups.len());
            Some(match o.init {
                Init::Random => {
                    MambaMixer::init_random(&mc, o.seed.wrapping_add(i as u64), &base.device)?
                }
                Init::Attention => {
                    let r = &o.recency.expect("checked above").layers[i];
                    let src = AttnSource {
                        q_rows: rows_of(&attn.q_proj.weight, &lp.mamba_heads, hd)?,
                        k_rows: rows_of(&attn.k_proj.weight, &lp.mamba_groups, hd)?,
                        v_rows: rows_of(&attn.v_proj.weight, &lp.mamba_groups, hd)?,
                        q_bias: attn
                            .q_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_heads, hd))
                            .transpose()?,
                        k_bias: attn
                            .k_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_groups, hd))
                            .transpose()?,
                        v_bias: attn
                            .v_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_groups, hd))
                            .transpose()?,
                        distance: lp
                            .mamba_heads
                            .iter()
                            .map(|&h| r.heads[h].distance)
                            .collect(),
                        output_rms: lp
                            .mamba_heads
                            .iter()
                            .map(|&h| r.heads[h].output_rms)
                            .collect(),
                    };
                    MambaMixer::init_from_attention(&src, &mc)
                        .with_context(|| format!("initialising layer {i}'s mixer"))?
                }
            })
        };
        let (mixer, local) = match (mixer, o.local) {
            (Some(mx), Some(lw)) => {
                let local = LocalAttention {
                    q_proj: linear_rows(&attn.q_proj, &lp.mamba_heads, hd)?,
                    k_proj: linear_rows(&attn.k_proj, &lp.mamba_groups, hd)?,
                    v_proj: linear_rows(&attn.v_proj, &lp.mamba_groups, hd)?,
                    n_heads: lp.mamba_heads.len(),
                    n_kv_heads: lp.mamba_groups.len(),
                    head_dim: hd,
                    settings: lw,
                };
                // The mixer adds to the windowed heads; it starts silent (ReZero-style zero
                // scale on its output norm) so the conversion changes nothing beyond the window.
                let mx = MambaMixer {
                    norm_weight: mx.norm_weight.zeros_like()?,
                    ..mx
                };
                (Some(mx), Some(local))
            }
            (mixer, _) => (mixer, None),
        };
        layers.push(DecoderLayer::with_split(bl, kept, mixer, split, hd)?.with_local(local));
    }
    let section = RecurformerSection {
        format_version: FORMAT_VERSION,
        plan: o.plan.clone(),
        mixer: settings,
        init: o.init,
        provenance: o.provenance.clone(),
    };
    Ok(Model {
        layers,
        recurformer: Some(section),
        ..base.clone()
    })
}

/// What the replaced attention heads of one layer supply to [`MambaMixer::init_from_attention`].
/// Rows are in head order: replaced group j owns query heads j*g..(j+1)*g of `q_rows`.
pub struct AttnSource {
    /// W_q rows of the replaced query heads, (n*P, d).
    pub q_rows: Tensor,
    /// W_k rows of the replaced KV groups, (G*P, d).
    pub k_rows: Tensor,
    /// W_v rows of the replaced KV groups, (G*P, d).
    pub v_rows: Tensor,
    /// Biases of those rows (Qwen2 has q/k/v biases), (n*P), (G*P), (G*P).
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    /// Mean attention distance (tokens) of each replaced query head, n values (recency.json).
    pub distance: Vec<f64>,
    /// RMS of each replaced head's output before o_proj, n values (recency.json).
    pub output_rms: Vec<f64>,
}

impl MambaMixer {
    /// Initialisation from the replaced attention heads (DESIGN.md, "Initialisation from the
    /// replaced heads"). Read as linear attention a head computes sum_s (q_t·k_s) v_s; the SSM
    /// computes sum_s (C_t·B_s) decay(t,s) Δ_s x_s, so C <- W_q, B <- W_k, x <- W_v.
    pub fn init_from_attention(src: &AttnSource, cfg: &MambaConfig) -> Result<Self> {
        cfg.validate()?;
        let (g_, p, ns, k, d) = (
            cfg.n_groups,
            cfg.head_dim,
            cfg.state_size,
            cfg.conv_kernel,
            cfg.d_model,
        );
        let n = cfg.n_heads();
        ensure!(
            ns == p,
            "initialisation from attention needs state_size = head_dim (B comes from W_k rows), \
             got state_size {ns}, head_dim {p}"
        );
        let check = |what: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
            if t.dims() != shape {
                bail!(
                    "attention source {what} has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                );
            }
            Ok(())
        };
        check("q_rows", &src.q_rows, &[n * p, d])?;
        check("k_rows", &src.k_rows, &[g_ * p, d])?;
        check("v_rows", &src.v_rows, &[g_ * p, d])?;
        ensure!(
            src.distance.len() == n && src.output_rms.len() == n,
            "attention source has {} distances and {} output RMS values for {n} replaced heads",
            src.distance.len(),
            src.output_rms.len()
        );
        for (i, (&dist, &rms)) in src.distance.iter().zip(&src.output_rms).enumerate() {
            ensure!(
                dist.is_finite() && dist >= 0.0,
                "replaced head {i} has mean attention distance {dist}"
            );
            ensure!(
                rms.is_finite() && rms > 0.0,
                "replaced head {i} has output RMS {rms}; expected a positive number"
            );
        }
        let dev = src.q_rows.device();
        let f32v =
            |v: Vec<f32>, len: usize| -> Result<Tensor> { Ok(Tensor::from_vec(v, len, dev)?) };
        let ch = cfg.conv_channels();

        // x, B, C from W_v, W_k, W_q. C is scaled by 1/sqrt(P) to mirror attention's q·k/sqrt(P);
        // the gated RMSNorm below makes the output scale independent of it, but it keeps C·B on
        // the scale of the attention logits. Departures from the attention head: no RoPE (the
        // decay carries position), and the conv's SiLU sees the projections (Mamba-2 applies SiLU
        // to x, B, C; silu(v) ≈ v only for positive v) — training recovers the difference.
        let x_proj = src.v_rows.to_dtype(DType::F32)?;
        let b_proj = src.k_rows.to_dtype(DType::F32)?;
        let c_proj = (src.q_rows.to_dtype(DType::F32)? / (p as f64).sqrt())?;

        // Conv "identity": the last tap (current token) 1, the others 0, so the conv passes the
        // projections through. q/k/v biases (Qwen2) are folded into the conv bias, which an
        // identity conv adds to the same channels (C's bias scaled like C).
        let mut w = vec![0f32; ch * k];
        for c in 0..ch {
            w[c * k + k - 1] = 1.0;
        }
        let conv_weight = Tensor::from_vec(w, (ch, k), dev)?;
        let bias_or_zero = |bias: &Option<Tensor>, len: usize, what: &str| -> Result<Tensor> {
            match bias {
                Some(b) => {
                    check(what, b, &[len])?;
                    Ok(b.to_dtype(DType::F32)?)
                }
                None => Ok(Tensor::zeros(len, DType::F32, dev)?),
            }
        };
        let conv_bias = Tensor::cat(
            &[
                bias_or_zero(&src.v_bias, g_ * p, "v_bias")?,
                bias_or_zero(&src.k_bias, g_ * ns, "k_bias")?,
                (bias_or_zero(&src.q_bias, n * ns, "q_bias")? / (p as f64).sqrt())?,
            ],
            0,
        )?;

        // Δ: dt_proj at zero and dt_bias = softplus^{-1}(Δ0), so Δ = Δ0 = 1 for every token at
        // the start; training makes it input-dependent. (mamba2.py samples Δ log-uniformly in
        // [1e-3, 1e-1] instead; here the decay is set through A from the measured distance.)
        let dt0 = ATTN_INIT_DT;
        let dt_bias_v = (dt0.exp() - 1.0).ln() as f32; // softplus^{-1}(Δ0) = log(e^Δ0 - 1)
        let dt_proj = Tensor::zeros((n, d), DType::F32, dev)?;
        let dt_bias = f32v(vec![dt_bias_v; n], n)?;

        // A: exp(Δ0 A) = exp(-1 / max(distance, 1)), i.e. a time constant of about the head's mean
        // attention distance in tokens: A_log = log(1 / (Δ0 max(distance, 1))).
        let a_log = f32v(
            src.distance
                .iter()
                .map(|&dist| (1.0 / (dt0 * dist.max(1.0))).ln() as f32)
                .collect(),
            n,
        )?;
        // D = 0: attention has no skip from the current value beyond its own attention weight.
        let dd = f32v(vec![0.0; n], n)?;
        // Gate: z_proj zero and z_bias at SiLU's 1, so the gate passes y unchanged at the start.
        let z_proj = Tensor::zeros((n * p, d), DType::F32, dev)?;
        let z_bias = f32v(vec![SILU_ONE as f32; n * p], n * p)?;
        // Gated RMSNorm scale: the replaced head's output RMS, so o_proj receives inputs on the
        // scale it was trained for (softmax averages values, the recurrence sums them).
        let norm_weight = f32v(
            src.output_rms
                .iter()
                .flat_map(|&r| std::iter::repeat_n(r as f32, p))
                .collect(),
            n * p,
        )?;
        Self::from_params(
            cfg,
            vec![
                x_proj,
                b_proj,
                c_proj,
                conv_weight,
                conv_bias,
                dt_proj,
                dt_bias,
                a_log,
                dd,
                z_proj,
                z_bias,
                norm_weight,
            ],
        )
        .context("initialising a mixer from attention")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mamba::scan::proj;
    use crate::model::mamba::tests::{max_abs, uni};
    use crate::model::options::ForwardOptions;
    use rand::SeedableRng;

    #[test]
    fn attention_init_sets_step_gate_and_decay() -> Result<()> {
        let cfg = MambaConfig {
            n_groups: 1,
            group_size: 2,
            head_dim: 8,
            state_size: 8,
            conv_kernel: 4,
            d_model: 12,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let src = AttnSource {
            q_rows: uni(&[16, 12], -1.0, 1.0, &mut rng)?,
            k_rows: uni(&[8, 12], -1.0, 1.0, &mut rng)?,
            v_rows: uni(&[8, 12], -1.0, 1.0, &mut rng)?,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            distance: vec![5.0, 0.3],
            output_rms: vec![0.25, 1.5],
        };
        let m = MambaMixer::init_from_attention(&src, &cfg)?;
        let u = uni(&[1, 9, 12], -2.0, 2.0, &mut rng)?;
        let dt = m.dt(&u)?; // (1, 9, 2)
        let (e, _) = max_abs(&dt, &dt.ones_like()?)?;
        assert!(e <= 1e-6, "Δ differs from 1 by {e}");
        let gate = m.z(&u)?.silu()?;
        let (e, _) = max_abs(&gate, &gate.ones_like()?)?;
        println!("attention init: |silu(z) - 1| max {e:.2e}");
        assert!(e <= 1e-2);
        let decay = dt
            .broadcast_mul(&m.a()?)?
            .exp()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, v) in decay.iter().enumerate() {
            let expect = (-1.0 / src.distance[i % 2].max(1.0)).exp();
            assert!(
                (*v as f64 - expect).abs() <= 1e-6,
                "head {}: {v} vs {expect}",
                i % 2
            );
        }
        // The identity conv passes the projections through: x = silu(W_v u) at every token.
        let (_, st) = m.forward_seq(&u, None, &ForwardOptions::default())?;
        let last = u.narrow(1, 8, 1)?.squeeze(1)?; // (1, 12)
                                                   // The conv state holds the raw (pre-conv) inputs of the last K-1 tokens, x first.
        let v_last = proj(&last, &src.v_rows)?; // (1, 8)
        let conv_x = st.conv.narrow(1, 0, 8)?.narrow(2, 2, 1)?.squeeze(2)?; // (1, 8)
        let (e, _) = max_abs(&conv_x, &v_last)?;
        assert!(e <= 1e-6, "{e}");
        // Output RMS per head equals norm.weight (y ⊙ gate normalised, then scaled), up to the
        // norm's eps (inputs are scaled so that the mean square of y ⊙ gate is well above 1e-5).
        let (y, _) = m.forward_seq(&u, None, &ForwardOptions::default())?;
        let y = y.reshape((1, 9, 2, 8))?;
        let rms = y.sqr()?.mean(3)?.sqrt()?.flatten_all()?.to_vec1::<f32>()?;
        for (i, r) in rms.iter().enumerate() {
            let expect = src.output_rms[i % 2] as f32;
            assert!(
                (r - expect).abs() <= 1e-3 * expect,
                "head {}: rms {r} vs {expect}",
                i % 2
            );
        }
        // Wrong sizes are rejected with the numbers.
        let bad = AttnSource {
            distance: vec![1.0],
            ..src
        };
        let err = MambaMixer::init_from_attention(&bad, &cfg).unwrap_err();
        assert!(err.to_string().contains("1 distances"), "{err}");
        Ok(())
    }
}
