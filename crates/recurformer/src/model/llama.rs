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

use crate::formats::config::ModelConfig;
use crate::formats::weights::Weights;
use crate::model::attention::{Attention, LayerCtx};
use crate::model::cache::{HybridCache, KvCache, KvDtype, LayerCache, WindowKv};
use crate::model::hybrid::{MambaSettings, RecurformerSection};
use crate::model::layers::{Linear, Mlp, RmsNorm, Rope};
use crate::model::mamba::MambaMixer;
use crate::model::options::{ForwardOptions, ProbsObserver};
use crate::model::plan::{LayerPlan, Plan};
use crate::model::quant::{drop_lm_head_f32, quantize_layer, QuantSummary, WeightFormat};
use crate::model::window::{KvWindow, LocalAttention};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

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
    /// The replaced heads' own attention over sinks + a recent window, added to the mixer's
    /// output; None unless the checkpoint's mixer settings ask for it.
    pub local: Option<LocalAttention>,
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
        let (split, kept_groups, mixer, local) = match hybrid {
            None => (
                HeadSplit {
                    attention_heads: (0..cfg.num_attention_heads).collect(),
                    mamba_heads: vec![],
                },
                cfg.num_key_value_heads,
                None,
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
                let local = match ms.local {
                    Some(lw) if !lp.mamba_groups.is_empty() => Some(
                        LocalAttention::load(
                            w,
                            &format!("{p}.local_attn"),
                            cfg,
                            lp.mamba_groups.len(),
                            lw,
                        )
                        .with_context(|| format!("layer {i} windowed heads"))?,
                    ),
                    _ => None,
                };
                (
                    HeadSplit {
                        attention_heads: lp.attention_heads.clone(),
                        mamba_heads: lp.mamba_heads.clone(),
                    },
                    lp.attention_groups.len(),
                    mixer,
                    local,
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
        let o_bias =
            cfg.attention_bias && cfg.architecture == crate::formats::config::Architecture::Llama;
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
            local,
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
            local: None,
            o_proj: base.o_proj.clone(),
            o_proj_run,
            split,
            post_attention_layernorm: base.post_attention_layernorm.clone(),
            mlp: base.mlp.clone(),
        })
    }

    /// This layer with windowed heads beside its mixer (used by `convert` and training copies).
    pub fn with_local(mut self, local: Option<LocalAttention>) -> Self {
        self.local = local;
        self
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
            let y = match &self.local {
                Some(local) => {
                    let wkv = cache
                        .window
                        .as_mut()
                        .context("layer cache has no window part for the windowed heads")?;
                    (y + local.forward(ctx, &h, wkv)?)? // (b, t, replaced*hd)
                }
                None => y,
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

impl DecoderLayer {
    /// One decode step of `n` sequences, each with its own layer cache: x (n, 1, d) -> (n, 1, d).
    /// One pass through the layer for all rows: norms, residuals and activations run on the n
    /// rows together, the projections row by row one right after another (`matmul_rows`, so
    /// rows after the first find the weights in cache), attention and the mixer per sequence on
    /// its own state. `cos`, `sin` are (n, 1, hd/2), each row at its own position. Same
    /// function as `forward` with t = 1 for each row.
    fn forward_step_batch(
        &self,
        rope: &Rope,
        cos: &Tensor,
        sin: &Tensor,
        x: &Tensor,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (_n, _, _) = x.dims3()?; // (n, 1, d)
        let opts = ForwardOptions::default();
        let h = self.input_layernorm.forward(x, &opts)?; // (n, 1, d)
        let mut parts = Vec::with_capacity(2);
        if let Some(attn) = &self.self_attn {
            let mut kvs = caches
                .iter_mut()
                .map(|c| {
                    c.kv.as_mut()
                        .context("layer cache has no KV part for the kept heads")
                })
                .collect::<Result<Vec<_>>>()?;
            parts.push(attn.heads_step_batch(rope, cos, sin, &h, &mut kvs)?); // (n, 1, kept*hd)
        }
        if let Some(mixer) = &self.mixer {
            // The stacked projection once for all rows, the scan step per sequence on its own
            // state.
            let mut sts = caches
                .iter_mut()
                .map(|c| {
                    c.recurrent
                        .as_mut()
                        .context("layer cache has no recurrent state for the mixer")
                })
                .collect::<Result<Vec<_>>>()?;
            let mut y = mixer.step_batch(&h, &mut sts)?; // (n, 1, replaced*hd)
            if let Some(local) = &self.local {
                let mut wkvs = caches
                    .iter_mut()
                    .map(|c| {
                        c.window
                            .as_mut()
                            .context("layer cache has no window part for the windowed heads")
                    })
                    .collect::<Result<Vec<_>>>()?;
                y = (y + local.step_batch(rope, cos, sin, &h, &mut wkvs)?)?; // (n, 1, replaced*hd)
            }
            parts.push(y);
        }
        // (n, 1, nh*hd), heads ordered [kept..., replaced...] to match o_proj_run's columns.
        let o_in = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 2)?
        };
        let x = (x + self.o_proj_run.forward_rows(&o_in)?)?;
        let h = self.post_attention_layernorm.forward(&x, &opts)?;
        Ok((&x + self.mlp.forward_rows(&h)?)?)
    }
}

impl DecoderLayer {
    /// The linear layers an inference forward runs, named under the layer (`self_attn.q_proj`,
    /// `local.k_proj`, `self_attn.o_proj`, `mlp.down_proj`, ...), for quantisation
    /// (`model::quant`). o_proj is the reordered copy the forward uses.
    pub(crate) fn inference_linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut v: Vec<(&'static str, &mut Linear)> = Vec::new();
        if let Some(a) = &mut self.self_attn {
            v.push(("self_attn.q_proj", &mut a.q_proj));
            v.push(("self_attn.k_proj", &mut a.k_proj));
            v.push(("self_attn.v_proj", &mut a.v_proj));
        }
        if let Some(w) = &mut self.local {
            v.push(("local.q_proj", &mut w.q_proj));
            v.push(("local.k_proj", &mut w.k_proj));
            v.push(("local.v_proj", &mut w.v_proj));
        }
        v.push(("self_attn.o_proj", &mut self.o_proj_run));
        v.push(("mlp.gate_proj", &mut self.mlp.gate_proj));
        v.push(("mlp.up_proj", &mut self.mlp.up_proj));
        v.push(("mlp.down_proj", &mut self.mlp.down_proj));
        v
    }

    /// The linear layers an inference forward runs (those of [`DecoderLayer::inference_linears_mut`]).
    pub(crate) fn inference_linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = Vec::new();
        if let Some(a) = &self.self_attn {
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj]);
        }
        if let Some(w) = &self.local {
            v.extend([&w.q_proj, &w.k_proj, &w.v_proj]);
        }
        v.extend([
            &self.o_proj_run,
            &self.mlp.gate_proj,
            &self.mlp.up_proj,
            &self.mlp.down_proj,
        ]);
        v
    }

    /// True when the o_proj the forward runs is quantised.
    pub(crate) fn o_proj_run_quantised(&self) -> bool {
        self.o_proj_run.quant.is_some()
    }

    /// True when a forward of this layer runs on a quantised weight.
    pub(crate) fn is_quantized(&self) -> bool {
        let q = |l: &Linear| l.quant.is_some();
        self.self_attn
            .as_ref()
            .is_some_and(|a| q(&a.q_proj) || q(&a.k_proj) || q(&a.v_proj))
            || self
                .local
                .as_ref()
                .is_some_and(|a| q(&a.q_proj) || q(&a.k_proj) || q(&a.v_proj))
            || q(&self.o_proj_run)
            || q(&self.mlp.gate_proj)
            || q(&self.mlp.up_proj)
            || q(&self.mlp.down_proj)
            || self.mixer.as_ref().is_some_and(|m| m.step_proj.is_some())
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
    Ok(Linear::new(o.weight.index_select(&idx, 1)?, o.bias.clone()))
}

/// Mixer hyper-parameters shared by every layer of a hybrid (the `recurformer.mixer` section of

/// Tokens per piece of a long prefill in [`Model::forward_last`]. llama.cpp's default
/// micro-batch is 512; at 1024 a piece's matmuls still run at full speed here.
pub const PREFILL_PIECE: usize = 1024;

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    /// Plan, mixer settings and provenance of a RecurFormer; None for a base model.
    pub recurformer: Option<RecurformerSection>,
    pub embed_tokens: Tensor, // (v, d)
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Tensor, // (v, d); the embedding itself when tied
    /// A quantised copy of the LM head for inference (`model::quant`); None in f32.
    pub lm_head_q: Option<crate::model::kernels::q8_gemv::QWeight>,
    /// The embedding table in q8_0 for an inference-only model whose f32 table was freed
    /// ([`crate::model::quant`]; with tied embeddings it is the quantised LM head itself): the
    /// lookup dequantises the rows it needs, as llama.cpp's `get_rows` does. None otherwise.
    pub embed_q: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    pub rope: Rope,
    pub device: Device,
    /// Element type of the KV caches `new_cache` makes (`--kv`); f32 unless set.
    pub kv_dtype: KvDtype,
    /// True once [`Model::drop_f32_copies`] freed the f32 weights that have quantised copies:
    /// the model can run inference but not be saved or trained.
    pub inference_only: bool,
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
        Ok(Self::load_hybrid_quantized(w, cfg, section, WeightFormat::F32)?.0)
    }

    /// [`Model::load_hybrid`] for a model used only for inference, with its linear layers, the
    /// mixers' stacked projections and the LM head in `format`: each layer is quantised as soon
    /// as it is read, and its f32 copies freed ([`crate::model::quant::quantize_layer`]), so that
    /// with tensors read on demand (`Weights`) the f32 weights of the whole model never coexist
    /// in memory (issue 20: the load was the peak of a bench run at 8K). The result equals
    /// `load_hybrid` followed by [`Model::quantize_for_inference`]. For `f32` it is `load_hybrid`.
    /// Returns the summary; its `freed` counts every f32 copy released, the LM head's included.
    pub fn load_hybrid_quantized(
        w: &Weights,
        cfg: &ModelConfig,
        section: Option<&RecurformerSection>,
        format: WeightFormat,
    ) -> Result<(Self, QuantSummary)> {
        let dtype = format.dtype();
        let mut summary = QuantSummary::default();
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
            .map(|i| {
                let mut layer =
                    DecoderLayer::load(w, i, cfg, hybrid.map(|(p, m)| (&p.layers[i], m)))?;
                if let Some(dt) = dtype {
                    quantize_layer(i, &mut layer, dt, true, &mut summary)?;
                }
                Ok(layer)
            })
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
        let mut model = Model {
            cfg: cfg.clone(),
            recurformer: section.cloned(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_q: None,
            embed_q: None,
            rope: Rope::new(cfg),
            device,
            kv_dtype: KvDtype::F32,
            inference_only: false,
        };
        if let Some(dt) = dtype {
            model.quantize_lm_head(dt, &mut summary)?;
            if summary.quantized > 0 {
                summary.freed += drop_lm_head_f32(&mut model)?;
            }
        }
        Ok((model, summary))
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
            if let Some(a) = &l.local {
                n += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj);
            }
            n += lin(&l.o_proj);
            n += lin(&l.mlp.gate_proj) + lin(&l.mlp.up_proj) + lin(&l.mlp.down_proj);
            n += l.input_layernorm.weight.elem_count()
                + l.post_attention_layernorm.weight.elem_count();
        }
        n
    }

    /// Sets the element type of the KV caches this model makes from now on (`--kv`).
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) {
        self.kv_dtype = dtype;
    }

    /// An empty cache for `batch` sequences, with room for `capacity` tokens before it grows;
    /// keys and values in [`Model::kv_dtype`].
    pub fn new_cache(&self, batch: usize, capacity: usize) -> HybridCache {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerCache {
                kv: l.self_attn.as_ref().map(|a| {
                    KvCache::new_typed(batch, a.n_kv_heads, a.head_dim, capacity, self.kv_dtype)
                }),
                // A zero state of a shape fixed by the validated config: only an out-of-memory
                // condition can fail here.
                recurrent: l.mixer.as_ref().map(|m| {
                    m.new_state(batch, &self.device)
                        .expect("allocating a zero recurrent state")
                }),
                window: l
                    .local
                    .as_ref()
                    .map(|a| WindowKv::new(a.settings.sinks, a.settings.window)),
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
        let (_, t) = ids.dims2()?;
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
        let mut x = self.embed(ids)?; // (b, t, d)
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

    /// Layers `first..` of a whole sequence from position 0 (a fresh cache), given `x` (b, t, d),
    /// the input of layer `first` as [`Model::forward_hidden`] computes it; returns the final-normed
    /// hidden state. When `inputs` is given, the input of every layer run is pushed onto it. Used to
    /// try a change to one layer without recomputing the layers below it (`convert::ceiling`).
    pub fn forward_from_layer(
        &self,
        first: usize,
        x: &Tensor,
        mut inputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if first >= self.layers.len() {
            bail!(
                "forward from layer {first}: the model has {} layers",
                self.layers.len()
            );
        }
        let opts = ForwardOptions::default();
        let mut cache = self.new_cache(b, t);
        let (cos, sin) = self.rope.tables(0, t, &self.device)?;
        let mut x = x.clone();
        for (i, (layer, lc)) in self
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .enumerate()
            .skip(first)
        {
            if let Some(v) = inputs.as_deref_mut() {
                v.push(x.clone());
            }
            let mut ctx = LayerCtx {
                layer: i,
                rope: &self.rope,
                cos: &cos,
                sin: &sin,
                opts: &opts,
                observer: None,
            };
            x = layer.forward(&mut ctx, &x, lc)?;
        }
        self.norm.forward(&x, &opts)
    }

    /// The token embeddings of `ids` (b, t): the input of layer 0, (b, t, d).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_rows(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The embedding rows of `ids` (n): (n, d), from the f32 table or, once that was freed, from
    /// the q8_0 one ([`Model::embed_q`]).
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.embed_q {
            None => Ok(self.embed_tokens.index_select(ids, 0)?),
            Some(q) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                crate::model::quant::q8_0_rows(q, &ids, &self.device)
            }
        }
    }

    /// Logits at every position: (b, t, v).
    pub fn forward(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, &ForwardOptions::default(), None)?;
        self.logits(&h)
    }

    /// Logits at the last position only: (b, v). What generation needs.
    ///
    /// A prompt longer than [`PREFILL_PIECE`] tokens is prefilled in pieces of that many, the
    /// cache carrying keys, values and recurrent state from one to the next (cached decode =
    /// full forward): peak memory then holds the activations of one piece, not of the whole
    /// prompt (BENCHMARKS.md, "Peak memory at 8K").
    pub fn forward_last(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let opts = ForwardOptions::default();
        let mut start = 0;
        while t - start > PREFILL_PIECE {
            self.forward_hidden(&ids.narrow(1, start, PREFILL_PIECE)?, cache, &opts, None)?;
            start += PREFILL_PIECE;
        }
        let h = self.forward_hidden(&ids.narrow(1, start, t - start)?, cache, &opts, None)?;
        let t = h.dim(1)?;
        Ok(self.logits(&h.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }

    /// One decode step for several sequences, each with its own batch-1 cache (their lengths
    /// may differ): `tokens[i]` is appended to `caches[i]`; returns the next-token logits (n, v).
    /// One pass through the layers for all the sequences: each layer's weights are fetched from
    /// memory once per step and reused from cache for the other rows, which is what makes
    /// serving several streams faster than running them one after another.
    pub fn forward_step_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut HybridCache],
    ) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || caches.len() != n {
            bail!(
                "batched decode step with {n} tokens and {} caches",
                caches.len()
            );
        }
        for (i, c) in caches.iter().enumerate() {
            if c.layers.len() != self.layers.len() {
                bail!(
                    "cache {i} has {} layers, model has {}",
                    c.layers.len(),
                    self.layers.len()
                );
            }
            if c.layers
                .iter()
                .any(|l| l.kv.as_ref().is_some_and(|k| k.batch != 1))
            {
                bail!(
                    "cache {i} holds more than one sequence; a batched step takes batch-1 caches"
                );
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self
            .embed_rows(&ids)?
            .reshape((n, 1, self.cfg.hidden_size))?; // (n, 1, d)
                                                     // Each row's rotary tables at its own position: (n, 1, hd/2).
        let mut cos = Vec::with_capacity(n);
        let mut sin = Vec::with_capacity(n);
        for c in caches.iter() {
            let (c_, s_) = self.rope.tables(c.seq_len, 1, &self.device)?; // (1, hd/2)
            cos.push(c_);
            sin.push(s_);
        }
        let cos = Tensor::stack(&cos, 0)?; // (n, 1, hd/2)
        let sin = Tensor::stack(&sin, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut lcs: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            x = layer.forward_step_batch(&self.rope, &cos, &sin, &x, &mut lcs)?;
        }
        for c in caches.iter_mut() {
            c.seq_len += 1;
        }
        let h = self.norm.forward(&x, &ForwardOptions::default())?; // (n, 1, d)
        let h = h.reshape((n, self.cfg.hidden_size))?; // (n, d)
        match &self.lm_head_q {
            Some(q) => crate::model::kernels::q8_gemv::qmatmul(q, &h), // (n, v)
            None => crate::model::layers::matmul_rows(&h, &self.lm_head), // (n, v)
        }
    }

    /// Hidden states (b, t, d) -> logits (b, t, v).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let h2 = h.reshape((b * t, d))?;
        let y = match &self.lm_head_q {
            Some(q) => crate::model::kernels::q8_gemv::qmatmul(q, &h2)?,
            None => h2.matmul(&self.lm_head.t()?)?,
        };
        Ok(y.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Bytes of the per-sequence state a model needs: KV per token (kept groups, in
    /// [`Model::kv_dtype`]) and the constant recurrent state (f32), as the cache will hold them.
    pub fn cache_bytes_per_token_and_state(&self) -> (usize, usize) {
        let mut kv = 0;
        let mut state = 0;
        for l in &self.layers {
            if let Some(a) = &l.self_attn {
                kv += 2 * a.n_kv_heads * a.head_dim * self.kv_dtype.size();
            }
            if let Some(mx) = &l.mixer {
                state += mx.cfg.state_bytes(1);
            }
            if let Some(a) = &l.local {
                state += a.max_state_bytes(1);
            }
        }
        (kv, state)
    }

    /// The base model with the KV groups that `plan` replaces restricted to `sinks` + a recent
    /// `window` of keys, every other group unchanged (`model::window`): the causal ceiling of the
    /// plan, the retrieval a mixer that reproduces only local attention could keep at best.
    pub fn with_kv_window(&self, plan: &Plan, sinks: usize, window: usize) -> Result<Model> {
        if self.recurformer.is_some() {
            bail!("a window restriction applies to a base model, not to a RecurFormer");
        }
        if window == 0 {
            bail!("attention window 0: a query must see at least its own key");
        }
        plan.validate(&self.cfg)?;
        let mut m = self.clone();
        for (layer, lp) in m.layers.iter_mut().zip(&plan.layers) {
            if lp.mamba_groups.is_empty() {
                continue;
            }
            let attn = layer
                .self_attn
                .as_mut()
                .with_context(|| format!("layer {}: no attention to restrict", lp.layer))?;
            attn.window = Some(KvWindow {
                groups: lp.mamba_groups.clone(),
                sinks,
                window,
            });
        }
        Ok(m)
    }
}
