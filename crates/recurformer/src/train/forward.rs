//! The student: trainable copies of the model (`make_trainable`, by scope) and its differentiable
//! forward (`forward_train`), with `FrozenMatmul`, the custom op that skips frozen weights' gradient
//! GEMMs. Not `Model::forward_hidden`: the KV cache appends with `slice_set`, which records no
//! backward (DESIGN.md, "Measured pitfalls").

use super::*;
use crate::checkpoint::save::named_tensors;
use crate::model::attention::Attention;
use crate::model::kernels::window_attention::window_attention_fused;
use crate::model::layers::{Linear, Mlp, RmsNorm, Rope};
use crate::model::llama::{DecoderLayer, Model};
use crate::model::mamba::{MambaMixer, PARAM_NAMES};
use crate::model::options::{AttentionImpl, ForwardOptions};
use crate::model::window::{windowed_attention, KeyLayout, LocalAttention, LocalWindow};
use anyhow::{bail, ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var, D};

pub(super) fn map_linear(
    f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>,
    name: &str,
    l: &Linear,
) -> Result<Linear> {
    let weight = f(&format!("{name}.weight"), &l.weight)?;
    let bias = match &l.bias {
        Some(b) => Some(f(&format!("{name}.bias"), b)?),
        None => None,
    };
    Ok(Linear::new(weight, bias))
}

/// `m` rebuilt with every tensor replaced by `f(name, tensor)`, names as in
/// `hybrid::named_tensors` (a tied `lm_head` stays the embedding). Used to make parameters
/// trainable and to convert dtypes.
pub fn map_model(m: &Model, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Model> {
    let embed_tokens = f("model.embed_tokens.weight", &m.embed_tokens)?;
    let lm_head = if m.cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        f("lm_head.weight", &m.lm_head)?
    };
    let norm = RmsNorm {
        weight: f("model.norm.weight", &m.norm.weight)?,
        eps: m.norm.eps,
    };
    let mut layers = Vec::with_capacity(m.layers.len());
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut base = l.clone();
        base.input_layernorm = RmsNorm {
            weight: f(
                &format!("{p}.input_layernorm.weight"),
                &l.input_layernorm.weight,
            )?,
            eps: l.input_layernorm.eps,
        };
        base.post_attention_layernorm = RmsNorm {
            weight: f(
                &format!("{p}.post_attention_layernorm.weight"),
                &l.post_attention_layernorm.weight,
            )?,
            eps: l.post_attention_layernorm.eps,
        };
        let self_attn = match &l.self_attn {
            Some(a) => Some(Attention {
                q_proj: map_linear(f, &format!("{p}.self_attn.q_proj"), &a.q_proj)?,
                k_proj: map_linear(f, &format!("{p}.self_attn.k_proj"), &a.k_proj)?,
                v_proj: map_linear(f, &format!("{p}.self_attn.v_proj"), &a.v_proj)?,
                n_heads: a.n_heads,
                n_kv_heads: a.n_kv_heads,
                head_dim: a.head_dim,
                window: a.window.clone(),
            }),
            None => None,
        };
        base.o_proj = map_linear(f, &format!("{p}.self_attn.o_proj"), &l.o_proj)?;
        base.mlp = Mlp {
            gate_proj: map_linear(f, &format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj)?,
            up_proj: map_linear(f, &format!("{p}.mlp.up_proj"), &l.mlp.up_proj)?,
            down_proj: map_linear(f, &format!("{p}.mlp.down_proj"), &l.mlp.down_proj)?,
        };
        let mixer = match &l.mixer {
            Some(mx) => {
                let mut params = Vec::with_capacity(PARAM_NAMES.len());
                for (name, t) in PARAM_NAMES.iter().zip(mx.params()) {
                    params.push(f(&format!("{p}.mixer.{name}"), t)?);
                }
                Some(MambaMixer::from_params(&mx.cfg, params)?)
            }
            None => None,
        };
        let local = match &l.local {
            Some(a) => Some(LocalAttention {
                q_proj: map_linear(f, &format!("{p}.local_attn.q_proj"), &a.q_proj)?,
                k_proj: map_linear(f, &format!("{p}.local_attn.k_proj"), &a.k_proj)?,
                v_proj: map_linear(f, &format!("{p}.local_attn.v_proj"), &a.v_proj)?,
                ..a.clone()
            }),
            None => None,
        };
        // with_split rebuilds the reordered o_proj from the mapped one.
        layers.push(
            DecoderLayer::with_split(&base, self_attn, mixer, l.split.clone(), m.cfg.head_dim)?
                .with_local(local),
        );
    }
    Ok(Model {
        embed_tokens,
        layers,
        norm,
        lm_head,
        // The mapped model runs in f32: a quantised head of `m` would not follow the mapping.
        lm_head_q: None,
        embed_q: None,
        ..m.clone()
    })
}

/// A copy of `m` in `dtype` (f64 for finite-difference checks).
pub fn model_to_dtype(m: &Model, dtype: DType) -> Result<Model> {
    map_model(m, &mut |_, t| Ok(t.to_dtype(dtype)?))
}

/// A copy of `m` whose trained tensors are fresh `Var`s (copies: `m` is left untouched), with the
/// vars under their checkpoint names, in `named_tensors` order; [`TrainScope::trains`] picks them.
pub fn make_trainable(m: &Model, scope: TrainScope) -> Result<(Model, Vec<(String, Var)>)> {
    let mixer_layers: Vec<String> = m
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mixer.is_some())
        .map(|(i, _)| format!("model.layers.{i}"))
        .collect();
    let mut vars = Vec::new();
    let model = map_model(m, &mut |name, t| {
        if scope.trains(name, &mixer_layers) {
            // detach() so that an existing Var is copied rather than shared.
            let v = Var::from_tensor(&t.detach())?;
            let out = v.as_tensor().clone();
            vars.push((name.to_string(), v));
            Ok(out)
        } else {
            Ok(t.clone())
        }
    })?;
    ensure!(
        !vars.is_empty(),
        "nothing to train: the model has no Mamba mixers (is it a converted RecurFormer?)"
    );
    Ok((model, vars))
}

/// o_proj with its input columns in [kept heads..., replaced heads...] order, as the forward
/// concatenates them (llama.rs keeps the same matrix precomputed; here it is rebuilt from `o_proj`
/// so that a trained o_proj is used and gradients reach it through `index_select`).
pub(super) fn o_proj_in_run_order(layer: &DecoderLayer, hd: usize) -> Result<Linear> {
    let order: Vec<usize> = layer
        .split
        .attention_heads
        .iter()
        .chain(&layer.split.mamba_heads)
        .copied()
        .collect();
    if order.iter().copied().eq(0..order.len()) {
        return Ok(layer.o_proj.clone());
    }
    let cols: Vec<u32> = order
        .iter()
        .flat_map(|&h| (h * hd..(h + 1) * hd).map(|c| c as u32))
        .collect();
    let idx = Tensor::new(cols.as_slice(), layer.o_proj.weight.device())?;
    Ok(Linear::new(
        layer.o_proj.weight.index_select(&idx, 1)?,
        layer.o_proj.bias.clone(),
    ))
}

/// x @ W^T for a weight W (out, in) that does not train. candle's matmul backward computes the
/// gradients of both operands, and for a frozen weight that is a second GEMM as large as the
/// forward's, thrown away (the output projection alone: 14.5 GFLOP per 256 tokens on SmolLM2).
/// This op's backward computes only the input's gradient, grad @ W.
pub(super) struct FrozenMatmul {
    pub(super) w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        let (out, w_in) = self.w.dims2()?;
        if w_in != inp {
            candle_core::bail!("frozen-matmul: input has {inp} columns, the weight {w_in}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("frozen-matmul runs on the CPU only");
        };
        let y = s.matmul(wc, (1, rows, out, inp), l, &wl.transpose(0, 1)?)?; // (rows, out)
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        g.matmul(&self.w).map(Some) // (rows, out) @ (out, in)
    }
}

/// `Linear::forward` for training: a frozen weight goes through `FrozenMatmul`, a trained one
/// (or an input outside the graph) through the plain matmul.
pub(super) fn linear_train(l: &Linear, x: &Tensor) -> Result<Tensor> {
    if l.weight.track_op() || !x.track_op() {
        return l.forward(x);
    }
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, inp))?
        .contiguous()?
        .apply_op1(FrozenMatmul {
            w: l.weight.contiguous()?,
        })?; // (rows, out)
    let y = match &l.bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty dims") = l.weight.dim(0)?;
    Ok(y.reshape(out)?)
}

/// `Model::logits` for training: hidden states (b, t, d) -> logits (b, t, v) through
/// `linear_train`.
pub fn logits_train(m: &Model, h: &Tensor) -> Result<Tensor> {
    linear_train(&Linear::new(m.lm_head.clone(), None), h)
}

/// Additive causal mask (t, t) in `dtype`: 0 on and below the diagonal, -inf above.
pub(super) fn causal_mask(t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(m, (t, t), dev)?.to_dtype(dtype)?)
}

/// The kept heads of one layer over a whole window from an empty cache, with differentiable ops
/// only: h (b, t, d) -> (b, t, nh_kept*hd). Same computation as `Attention::heads_forward` on the
/// eager path, without the KV cache (whose `slice_set` stops gradients).
pub(super) fn attention_train(
    a: &Attention,
    rope: &Rope,
    h: &Tensor,
    cos_sin: (&Tensor, &Tensor),
    mask: &Tensor,
    opts: &ForwardOptions,
) -> Result<Tensor> {
    let (b, t, _) = h.dims3()?;
    let (nh, nkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
    if a.window.is_some() {
        bail!("training through attention restricted to a window is not supported");
    }
    let g = nh / nkv;
    let q = linear_train(&a.q_proj, h)?
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?; // (b, nh, t, hd)
    let k = linear_train(&a.k_proj, h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?; // (b, nkv, t, hd)
    let v = linear_train(&a.v_proj, h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?; // (b, nkv, t, hd)
    let q = rope.apply(&q, cos_sin.0, cos_sin.1, opts)?;
    let k = rope.apply(&k, cos_sin.0, cos_sin.1, opts)?;
    // Repeat each KV head for its g query heads (transformers `repeat_kv`).
    let rep = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, nkv, g, t, hd))?
            .reshape((b, nh, t, hd))?) // (b, nh, t, hd)
    };
    let (k, v) = (rep(&k)?, rep(&v)?);
    let scores = (q.contiguous()?.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (b, nh, t, t)
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
    let o = probs.matmul(&v)?; // (b, nh, t, hd)
    Ok(o.transpose(1, 2)?.reshape((b, t, nh * hd))?) // (b, t, nh*hd)
}

/// The windowed heads beside a mixer on the training path: x (b, t, d) from position 0 ->
/// (b, t, n*hd), every op recording a backward pass; frozen projections skip their weight
/// gradients as in [`attention_train`].
pub(super) fn local_train(
    la: &LocalAttention,
    rope: &Rope,
    x: &Tensor,
    cos_sin: (&Tensor, &Tensor),
    opts: &ForwardOptions,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (q, k, v) = la.qkv(x, rope, cos_sin, opts, &|l, x| linear_train(l, x))?;
    let LocalWindow { sinks, window } = la.settings;
    // One CPU op with its own backward (`kernels::window_attention`); the graph elsewhere.
    let fused = q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64);
    let o = if fused && !crate::model::kernels::graph_kernels() {
        window_attention_fused(&q, &k, &v, sinks, window)?
    } else {
        windowed_attention(&q, &k, &v, KeyLayout::default(), sinks, window, true)?
    }; // (b, n, t, hd)
    Ok(o.transpose(1, 2)?
        .reshape((b, t, la.n_heads * la.head_dim))?)
}

/// The training forward of a (hybrid) model: `ids` (b, t) from an empty state -> final normalised
/// hidden states (b, t, d), every op recording a backward pass (eager attention, `rms_norm_slow`,
/// `rope_slow`, the mixer's graph scan). Works in the model's dtype (f32, or f64 for checks).
/// Equal to `Model::forward_hidden` on the eager path (tested), but gradients flow through the
/// kept heads' keys and values too.
pub fn forward_train(m: &Model, ids: &Tensor) -> Result<Tensor> {
    Ok(forward_train_states(m, ids, false)?.0)
}

/// [`forward_train`], also returning every layer's normalised input (b, t, d) when `collect` is
/// set (empty otherwise), in layer order.
pub fn forward_train_states(
    m: &Model,
    ids: &Tensor,
    collect: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, t) = ids.dims2()?;
    ensure!(t >= 1, "forward called with no tokens");
    let max_id = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
    ensure!(
        (max_id as usize) < m.cfg.vocab_size,
        "token id {max_id} is outside the vocabulary of {}",
        m.cfg.vocab_size
    );
    let d = m.cfg.hidden_size;
    let dtype = m.embed_tokens.dtype();
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: true,
    };
    let mut x = m
        .embed_tokens
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))?; // (b, t, d)
    let (cos, sin) = m.rope.tables(0, t, &m.device)?; // (t, hd/2)
    let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
    let mask = causal_mask(t, dtype, &m.device)?;
    let mut states = Vec::with_capacity(if collect { m.layers.len() } else { 0 });
    for layer in &m.layers {
        let h = layer.input_layernorm.forward(&x, &opts)?; // (b, t, d)
        if collect {
            states.push(h.clone());
        }
        let mut parts = Vec::with_capacity(2);
        if let Some(a) = &layer.self_attn {
            parts.push(attention_train(a, &m.rope, &h, (&cos, &sin), &mask, &opts)?);
        }
        if let Some(mx) = &layer.mixer {
            let y = mx.forward_seq(&h, None, &opts)?.0; // (b, t, n*hd)
            parts.push(match &layer.local {
                Some(la) => (y + local_train(la, &m.rope, &h, (&cos, &sin), &opts)?)?,
                None => y,
            });
        }
        let o_in = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 2)?
        }; // (b, t, nh*hd), [kept..., replaced...]
        let o = linear_train(&o_proj_in_run_order(layer, m.cfg.head_dim)?, &o_in)?;
        x = (x + o)?;
        let h = layer.post_attention_layernorm.forward(&x, &opts)?;
        let mlp = &layer.mlp;
        let gate = linear_train(&mlp.gate_proj, &h)?.silu()?;
        let up = linear_train(&mlp.up_proj, &h)?;
        x = (&x + linear_train(&mlp.down_proj, &(gate * up)?)?)?;
    }
    Ok((m.norm.forward(&x, &opts)?, states))
}

/// Names of the tensors `named_tensors` would save for `m` (used by tests to compare checkpoints).
pub fn tensor_names(m: &Model) -> Vec<String> {
    named_tensors(m).into_iter().map(|(n, _)| n).collect()
}
