//! Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral without sliding window) and
//! Qwen2, which is the same network with biases on q/k/v.
//!
//! Follows Hugging Face transformers `modeling_llama.py` / `modeling_qwen2.py` (v4.5x): pre-norm
//! blocks, RMSNorm, rotary embeddings in the "rotate half" layout, grouped-query attention, SwiGLU
//! MLP. Field names equal the checkpoint's tensor names, so loading is one-to-one.
//!
//! Glossary: b batch, t new tokens, s total keys (cached + new), nh query heads, nkv KV heads,
//! g = nh / nkv query heads per KV head, hd head dim, d hidden size, v vocabulary.
//!
//! The model is immutable; the KV cache is passed in (`HybridCache`).

use crate::cache::{HybridCache, KvCache, LayerCache};
use crate::config::{ModelConfig, RopeScaling};
use crate::hybrid::RecurformerSection;
use crate::mamba::{MambaConfig, MambaMixer};
use crate::plan::LayerPlan;
use crate::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// Which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// Grouped-query matmuls without repeating K/V, queries processed in chunks so the score
    /// matrix stays small at long context. The inference path.
    #[default]
    Fast,
    /// The textbook computation (repeat K/V per query head, full score matrix, differentiable
    /// softmax); can hand the attention probabilities to an observer. The reference path.
    Eager,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attention: AttentionImpl,
    /// Use only ops that record a backward pass (candle's fused rms_norm/rope/softmax do not).
    pub differentiable: bool,
}

/// What the eager path shows an observer for each layer.
pub struct AttnObservation<'a> {
    pub layer: usize,
    /// Attention probabilities (b, nh, t, s).
    pub probs: &'a Tensor,
    /// The heads' outputs before o_proj (b, nh, t, hd).
    pub heads_out: &'a Tensor,
    /// The layer's normalised hidden state that attention read (b, t, d).
    pub input: &'a Tensor,
}

/// Receives every layer's attention probabilities and head outputs on the eager path.
pub type ProbsObserver<'a> = dyn FnMut(&AttnObservation) -> Result<()> + 'a;

#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // x: (.., in) -> (.., out), as one 2-D GEMM over all leading positions.
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, inp))?.matmul(&self.weight.t()?)?; // (rows, out)
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(name, &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        if opts.differentiable {
            Ok(candle_nn::ops::rms_norm_slow(
                x,
                &self.weight,
                self.eps as f32,
            )?)
        } else {
            Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?)
        }
    }
}

/// Rotary position embedding, "rotate half" layout (transformers `apply_rotary_pos_emb`).
#[derive(Debug, Clone)]
pub struct Rope {
    /// hd/2 inverse frequencies, after scaling.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let hd = cfg.head_dim;
        // transformers computes base ** (arange(0, dim, 2) / dim) in float32.
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        let inv_freq = match &cfg.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => {
                base.iter().map(|f| f / *factor as f32).collect()
            }
            Some(RopeScaling::Factors { factors }) => base
                .iter()
                .zip(factors)
                .map(|(f, s)| f / *s as f32)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // transformers `_compute_llama3_parameters`: long wavelengths are divided by
                // `factor`, short ones kept, the band between interpolated smoothly.
                let old = *original_max_position_embeddings as f32;
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope { inv_freq }
    }

    /// cos and sin tables for positions offset..offset+t, each (t, hd/2).
    pub fn tables(&self, offset: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in offset..offset + t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }

    /// x: (b, h, t, hd) -> same shape, rotated.
    pub fn apply(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        if opts.differentiable {
            Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?)
        } else {
            Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(w: &Weights, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), i, d, false)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), i, d, false)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), d, i, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// Additive causal mask for `t` queries at positions offset.. against `s` keys: (t, s).
pub fn causal_mask(t: usize, s: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}

/// Softmax attention of `q` (b, nh, t, hd) against `k`, `v` (b, nkv, s, hd), queries at
/// positions s-t..s. Returns (b, nh, t, hd) and, on the eager path, the probabilities.
pub struct AttentionInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub opts: &'a ForwardOptions,
    pub want_probs: bool,
}

/// Up to this many new queries, the fast path uses the decode kernel (memory-bound regime).
pub const DECODE_KERNEL_MAX_QUERIES: usize = 4;

/// Largest score block (elements) the fast path materialises at once: 16M floats = 64 MB.
const FAST_SCORE_BLOCK: usize = 1 << 24;

pub fn attention(inp: AttentionInputs) -> Result<(Tensor, Option<Tensor>)> {
    attention_blocked(inp, FAST_SCORE_BLOCK)
}

/// `attention` with the fast path's score block (elements) given: tests use small blocks to
/// exercise query chunking.
pub fn attention_blocked(
    inp: AttentionInputs,
    score_block: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, nh, t, hd) = inp.q.dims4()?;
    let (_, nkv, s, _) = inp.k.dims4()?;
    let g = nh / nkv;
    let offset = s - t;
    let scale = 1.0 / (hd as f64).sqrt();
    match inp.opts.attention {
        AttentionImpl::Eager => {
            // Repeat each KV head for the g query heads that read it (transformers `repeat_kv`).
            let rep = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, nkv, g, s, hd))?
                    .reshape((b, nh, s, hd))?)
            };
            let (k, v) = (rep(inp.k)?, rep(inp.v)?);
            let scores = (inp.q.contiguous()?.matmul(&k.t()?)? * scale)?; // (b, nh, t, s)
            let scores = scores.broadcast_add(&causal_mask(t, s, offset, inp.q.device())?)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let out = probs.matmul(&v)?; // (b, nh, t, hd)
            Ok((out, if inp.want_probs { Some(probs) } else { None }))
        }
        AttentionImpl::Fast => {
            if inp.want_probs {
                bail!("the fast attention path does not return probabilities; use the eager path");
            }
            if t <= DECODE_KERNEL_MAX_QUERIES && inp.q.device().is_cpu() {
                let out = crate::decode_attention::decode_attention(inp.q, inp.k, inp.v, scale)?;
                return Ok((out, None));
            }
            // Query heads of one group are adjacent (head h reads KV head h / g), so the queries of
            // a group stack into the rows of one matrix and share a single K^T / V matmul.
            let q = inp.q.contiguous()?.reshape((b, nkv, g, t, hd))?;
            let chunk = (score_block / (b * nh * s).max(1)).clamp(1, t.max(1));
            let mut outs = Vec::with_capacity(t.div_ceil(chunk));
            let mut start = 0;
            while start < t {
                let c = chunk.min(t - start);
                let keys = offset + start + c; // keys visible to the last query of the chunk
                let qc = q
                    .narrow(3, start, c)?
                    .contiguous()?
                    .reshape((b, nkv, g * c, hd))?;
                let kc = inp.k.narrow(2, 0, keys)?;
                let vc = inp.v.narrow(2, 0, keys)?;
                let mut scores = (qc.matmul(&kc.t()?)? * scale)?; // (b, nkv, g*c, keys)
                if c > 1 || offset + start + 1 < keys {
                    let mask = causal_mask(c, keys, offset + start, inp.q.device())?; // (c, keys)
                    scores = scores
                        .reshape((b, nkv, g, c, keys))?
                        .broadcast_add(&mask)?
                        .reshape((b, nkv, g * c, keys))?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let o = probs.matmul(&vc.contiguous()?)?; // (b, nkv, g*c, hd)
                outs.push(o.reshape((b, nkv, g, c, hd))?);
                start += c;
            }
            let out = if outs.len() == 1 {
                outs.pop().expect("one chunk")
            } else {
                Tensor::cat(&outs, 3)?
            };
            Ok((out.reshape((b, nh, t, hd))?, None))
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// Loads q/k/v for `n_heads` query heads over `n_kv_heads` KV heads: all of them in a base
    /// model, the kept ones in a hybrid (whose checkpoint stores only the kept rows).
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &ModelConfig,
        n_heads: usize,
        n_kv_heads: usize,
    ) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), n_heads * hd, d, bias)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), n_kv_heads * hd, d, bias)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), n_kv_heads * hd, d, bias)?,
            n_heads,
            n_kv_heads,
            head_dim: hd,
        })
    }

    /// The heads' outputs before o_proj: x (b, t, d) -> (b, t, nh*hd).
    pub fn heads_forward(
        &self,
        ctx: &mut LayerCtx,
        x: &Tensor,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?; // (b, nh, t, hd)
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // (b, nkv, t, hd)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // (b, nkv, t, hd)
        let q = ctx.rope.apply(&q, ctx.cos, ctx.sin, ctx.opts)?;
        let k = ctx.rope.apply(&k, ctx.cos, ctx.sin, ctx.opts)?;
        let (k_all, v_all) = kv.append(&k, &v)?; // (b, nkv, s, hd)
        let want_probs = ctx.observer.is_some();
        let (o, probs) = attention(AttentionInputs {
            q: &q,
            k: &k_all,
            v: &v_all,
            opts: ctx.opts,
            want_probs,
        })?;
        if let (Some(obs), Some(p)) = (ctx.observer.as_mut(), probs.as_ref()) {
            obs(&AttnObservation {
                layer: ctx.layer,
                probs: p,
                heads_out: &o,
                input: x,
            })?;
        }
        Ok(o.transpose(1, 2)?.reshape((b, t, nh * hd))?) // (b, t, nh*hd)
    }
}

/// What a layer's forward needs besides its input: rope tables, options, and the observer.
pub struct LayerCtx<'a, 'o> {
    pub layer: usize,
    pub rope: &'a Rope,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub opts: &'a ForwardOptions,
    pub observer: Option<&'a mut ProbsObserver<'o>>,
}

/// Which query heads of a layer stay softmax attention and which a Mamba mixer replaces
/// (whole KV groups; see `plan.rs`). A base model keeps every head.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSplit {
    pub attention_heads: Vec<usize>,
    pub mamba_heads: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    /// Softmax attention over the kept heads; None when the mixer replaced every group.
    pub self_attn: Option<Attention>,
    /// The Mamba mixer standing in for the replaced heads; None in a base model.
    pub mixer: Option<MambaMixer>,
    /// o_proj as stored in the checkpoint, (d, nh*hd), heads in their original order.
    pub o_proj: Linear,
    /// o_proj with its input columns reordered to [kept heads..., replaced heads...], the order in
    /// which the forward concatenates attention and mixer outputs: one GEMM, no scatter.
    o_proj_run: Linear,
    pub split: HeadSplit,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(
        w: &Weights,
        i: usize,
        cfg: &ModelConfig,
        hybrid: Option<(&LayerPlan, &MambaSettings)>,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let g = cfg.group_size();
        let (split, kept_groups, mixer) = match hybrid {
            None => (
                HeadSplit {
                    attention_heads: (0..cfg.num_attention_heads).collect(),
                    mamba_heads: vec![],
                },
                cfg.num_key_value_heads,
                None,
            ),
            Some((lp, ms)) => {
                let mixer = if lp.mamba_groups.is_empty() {
                    None
                } else {
                    let mc = ms.mamba_config(cfg, lp.mamba_groups.len());
                    Some(
                        MambaMixer::load(w, &format!("{p}.mixer"), &mc)
                            .with_context(|| format!("layer {i} mixer"))?,
                    )
                };
                (
                    HeadSplit {
                        attention_heads: lp.attention_heads.clone(),
                        mamba_heads: lp.mamba_heads.clone(),
                    },
                    lp.attention_groups.len(),
                    mixer,
                )
            }
        };
        let self_attn = if kept_groups == 0 {
            None
        } else {
            Some(Attention::load(
                w,
                &format!("{p}.self_attn"),
                cfg,
                kept_groups * g,
                kept_groups,
            )?)
        };
        let (d, nh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
        // transformers' `attention_bias` also puts a bias on o_proj for Llama; Qwen2 never does.
        let o_bias = cfg.attention_bias && cfg.architecture == crate::config::Architecture::Llama;
        let o_proj = Linear::load(w, &format!("{p}.self_attn.o_proj"), d, nh * hd, o_bias)?;
        let o_proj_run = reorder_o_proj(&o_proj, &split, hd)?;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                d,
                cfg.rms_norm_eps,
            )?,
            self_attn,
            mixer,
            o_proj,
            o_proj_run,
            split,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                d,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    /// A layer of `base` with its heads split between `self_attn` and `mixer` (used by `convert`).
    pub fn with_split(
        base: &DecoderLayer,
        self_attn: Option<Attention>,
        mixer: Option<MambaMixer>,
        split: HeadSplit,
        head_dim: usize,
    ) -> Result<Self> {
        let o_proj_run = reorder_o_proj(&base.o_proj, &split, head_dim)?;
        Ok(DecoderLayer {
            input_layernorm: base.input_layernorm.clone(),
            self_attn,
            mixer,
            o_proj: base.o_proj.clone(),
            o_proj_run,
            split,
            post_attention_layernorm: base.post_attention_layernorm.clone(),
            mlp: base.mlp.clone(),
        })
    }

    pub fn forward(
        &self,
        ctx: &mut LayerCtx,
        x: &Tensor,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let h = self.input_layernorm.forward(x, ctx.opts)?;
        let mut parts = Vec::with_capacity(2);
        if let Some(attn) = &self.self_attn {
            let kv = cache
                .kv
                .as_mut()
                .context("layer cache has no KV part for the kept heads")?;
            parts.push(attn.heads_forward(ctx, &h, kv)?); // (b, t, kept*hd)
        }
        if let Some(mixer) = &self.mixer {
            let state = cache
                .recurrent
                .as_mut()
                .context("layer cache has no recurrent state for the mixer")?;
            let y = if t == 1 {
                mixer.step(&h, state)? // (b, 1, replaced*hd)
            } else {
                let (y, new_state) = mixer.forward_seq(&h, Some(state), ctx.opts)?; // (b, t, replaced*hd)
                *state = new_state;
                y
            };
            parts.push(y);
        }
        // (b, t, nh*hd), heads ordered [kept..., replaced...] to match o_proj_run's columns.
        let o_in = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 2)?
        };
        let x = (x + self.o_proj_run.forward(&o_in)?)?;
        let h = self.post_attention_layernorm.forward(&x, ctx.opts)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }
}

/// o_proj with input columns ordered [kept heads..., replaced heads...].
fn reorder_o_proj(o: &Linear, split: &HeadSplit, hd: usize) -> Result<Linear> {
    let nh = split.attention_heads.len() + split.mamba_heads.len();
    let order: Vec<usize> = split
        .attention_heads
        .iter()
        .chain(&split.mamba_heads)
        .copied()
        .collect();
    if order.iter().copied().eq(0..nh) {
        return Ok(o.clone());
    }
    let cols: Vec<u32> = order
        .iter()
        .flat_map(|&h| (h * hd..(h + 1) * hd).map(|c| c as u32))
        .collect();
    let idx = Tensor::new(cols.as_slice(), o.weight.device())?;
    Ok(Linear {
        weight: o.weight.index_select(&idx, 1)?,
        bias: o.bias.clone(),
    })
}

/// Mixer hyper-parameters shared by every layer of a hybrid (the `recurformer.mixer` section of
/// config.json).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MambaSettings {
    pub state_size: usize,
    pub conv_kernel: usize,
}

impl MambaSettings {
    pub fn mamba_config(&self, cfg: &ModelConfig, n_groups: usize) -> MambaConfig {
        MambaConfig {
            n_groups,
            group_size: cfg.group_size(),
            head_dim: cfg.head_dim,
            state_size: self.state_size,
            conv_kernel: self.conv_kernel,
            d_model: cfg.hidden_size,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    /// Plan, mixer settings and provenance of a RecurFormer; None for a base model.
    pub recurformer: Option<RecurformerSection>,
    pub embed_tokens: Tensor, // (v, d)
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Tensor, // (v, d); the embedding itself when tied
    pub rope: Rope,
    pub device: Device,
}

impl Model {
    /// Builds the base model from `weights`, checking every tensor's shape and that none is left over.
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self> {
        Self::load_hybrid(w, cfg, None)
    }

    /// Builds a base model (`section` None) or a RecurFormer whose layers follow the section's plan.
    pub fn load_hybrid(
        w: &Weights,
        cfg: &ModelConfig,
        section: Option<&RecurformerSection>,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(s) = section {
            s.plan
                .validate(cfg)
                .context("the plan in config.json does not fit the model")?;
        }
        let hybrid = section.map(|s| (&s.plan, &s.mixer));
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i, cfg, hybrid.map(|(p, m)| (&p.layers[i], m))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm.weight", d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some exporters also save the tied copy; it carries no information.
            w.skip("lm_head.weight");
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight", &[v, d])?
        };
        for name in w.names() {
            if name.ends_with("rotary_emb.inv_freq") {
                w.skip(name); // recomputed from the config
            }
        }
        w.finish()?;
        let device = embed_tokens.device().clone();
        Ok(Model {
            cfg: cfg.clone(),
            recurformer: section.cloned(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            device,
        })
    }

    pub fn num_parameters(&self) -> usize {
        let lin =
            |l: &Linear| l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count());
        let mut n = self.embed_tokens.elem_count() + self.norm.weight.elem_count();
        if !self.cfg.tie_word_embeddings {
            n += self.lm_head.elem_count();
        }
        for l in &self.layers {
            if let Some(a) = &l.self_attn {
                n += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj);
            }
            if let Some(m) = &l.mixer {
                n += m.params().iter().map(|p| p.elem_count()).sum::<usize>();
            }
            n += lin(&l.o_proj);
            n += lin(&l.mlp.gate_proj) + lin(&l.mlp.up_proj) + lin(&l.mlp.down_proj);
            n += l.input_layernorm.weight.elem_count()
                + l.post_attention_layernorm.weight.elem_count();
        }
        n
    }

    /// An empty cache for `batch` sequences, with room for `capacity` tokens before it grows.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> HybridCache {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerCache {
                kv: l
                    .self_attn
                    .as_ref()
                    .map(|a| KvCache::new(batch, a.n_kv_heads, a.head_dim, capacity)),
                // A zero state of a shape fixed by the validated config: only an out-of-memory
                // condition can fail here.
                recurrent: l.mixer.as_ref().map(|m| {
                    m.new_state(batch, &self.device)
                        .expect("allocating a zero recurrent state")
                }),
            })
            .collect();
        HybridCache::new(layers, self.device.clone())
    }

    /// Runs the decoder over `ids` (b, t) appended to `cache`; returns final hidden states (b, t, d).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: &mut HybridCache,
        opts: &ForwardOptions,
        mut observer: Option<&mut ProbsObserver>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 {
            bail!("forward called with no tokens");
        }
        if cache.layers.len() != self.layers.len() {
            bail!(
                "cache has {} layers, model has {}",
                cache.layers.len(),
                self.layers.len()
            );
        }
        let max_id = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            bail!(
                "token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let offset = cache.seq_len;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?; // (b, t, d)
        let (cos, sin) = self.rope.tables(offset, t, &self.device)?;
        for (i, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let mut ctx = LayerCtx {
                layer: i,
                rope: &self.rope,
                cos: &cos,
                sin: &sin,
                opts,
                observer: observer.as_deref_mut(),
            };
            x = layer.forward(&mut ctx, &x, lc)?;
        }
        cache.seq_len += t;
        self.norm.forward(&x, opts)
    }

    /// Logits at every position: (b, t, v).
    pub fn forward(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, &ForwardOptions::default(), None)?;
        self.logits(&h)
    }

    /// Logits at the last position only: (b, v). What generation needs.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, &ForwardOptions::default(), None)?;
        let t = h.dim(1)?;
        Ok(self.logits(&h.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }

    /// Hidden states (b, t, d) -> logits (b, t, v).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        Ok(h.reshape((b * t, d))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, self.cfg.vocab_size))?)
    }
}
