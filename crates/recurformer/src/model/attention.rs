//! Softmax attention over the heads a layer keeps: the fast grouped-query path (the decode kernel
//! for a few new queries, the tiled online-softmax kernel for prefill; chunked score blocks
//! through candle's GEMM off the CPU or with `RECURFORMER_CHUNKED_PREFILL=1`) and the eager
//! reference path that can hand its probabilities to an observer. Keys and values come from the
//! cache in its dtype (f32 or f16, `cache::KvDtype`): the kernels read f16 directly, the graph
//! paths widen it to f32 first.
//!
//! Glossary: b batch, t new tokens, s total keys (cached + new), nh query heads, nkv KV heads,
//! g = nh / nkv query heads per KV head, hd head dim, d hidden size.

use crate::formats::config::ModelConfig;
use crate::formats::weights::Weights;
use crate::model::cache::KvCache;
use crate::model::layers::{Linear, Rope};
use crate::model::options::{AttentionImpl, AttnObservation, ForwardOptions, ProbsObserver};
use crate::model::window::{windowed_attention, KeyLayout, KvWindow};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

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
    attention_impl(inp, None)
}

/// `attention` with prefill (more than [`DECODE_KERNEL_MAX_QUERIES`] queries) on the chunked
/// path, whatever the device, with its score block (elements) given: tests use small blocks to
/// exercise query chunking.
pub fn attention_blocked(
    inp: AttentionInputs,
    score_block: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    attention_impl(inp, Some(score_block))
}

/// `chunked`: the chunked path's score block, forcing that path; None chooses (the tiled kernel
/// on the CPU unless `RECURFORMER_CHUNKED_PREFILL` is set).
fn attention_impl(
    inp: AttentionInputs,
    chunked: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    let score_block = chunked.unwrap_or(FAST_SCORE_BLOCK);
    let (b, nh, t, hd) = inp.q.dims4()?;
    let (_, nkv, s, _) = inp.k.dims4()?;
    let g = nh / nkv;
    let offset = s - t;
    let scale = 1.0 / (hd as f64).sqrt();
    let cpu = inp.q.device().is_cpu();
    // The graph paths below run in the queries' type (f32; f64 in gradient checks): an f16
    // cache is widened to it for them.
    let widen = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(inp.q.dtype())?) };
    match inp.opts.attention {
        AttentionImpl::Eager => {
            let (k, v) = (&widen(inp.k)?, &widen(inp.v)?);
            // Repeat each KV head for the g query heads that read it (transformers `repeat_kv`).
            let rep = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, nkv, g, s, hd))?
                    .reshape((b, nh, s, hd))?)
            };
            let (k, v) = (rep(k)?, rep(v)?);
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
            if t <= DECODE_KERNEL_MAX_QUERIES && cpu {
                let out = crate::model::kernels::decode_attention::decode_attention(
                    inp.q, inp.k, inp.v, scale,
                )?;
                return Ok((out, None));
            }
            // The tiled kernel needs SIMD to beat candle's GEMM (its scalar fallback measured
            // 0.6x the chunked path at 2K, the AVX2 / AVX-512 builds 3.2-3.5x faster).
            let simd = crate::model::kernels::simd::Isa::detect()
                != crate::model::kernels::simd::Isa::Scalar;
            if cpu && simd && chunked.is_none() && !crate::model::kernels::chunked_prefill() {
                let out = crate::model::kernels::prefill_attention::prefill_attention(
                    inp.q,
                    inp.k,
                    inp.v,
                    Default::default(),
                )?;
                return Ok((out, None));
            }
            let (k, v) = (&widen(inp.k)?, &widen(inp.v)?);
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
                let kc = k.narrow(2, 0, keys)?;
                let vc = v.narrow(2, 0, keys)?;
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

/// What a layer's forward needs besides its input: rope tables, options, and the observer.
pub struct LayerCtx<'a, 'o> {
    pub layer: usize,
    pub rope: &'a Rope,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub opts: &'a ForwardOptions,
    pub observer: Option<&'a mut ProbsObserver<'o>>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Groups restricted to sinks + a recent window (the causal ceiling of a plan, see
    /// `model::window`); None for ordinary attention.
    pub window: Option<KvWindow>,
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
            window: None,
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
        let (o, probs) = match &self.window {
            None => attention(AttentionInputs {
                q: &q,
                k: &k_all,
                v: &v_all,
                opts: ctx.opts,
                want_probs,
            })?,
            Some(w) => {
                if want_probs {
                    bail!(
                        "layer {}: attention restricted to a window does not hand probabilities to \
                         an observer",
                        ctx.layer
                    );
                }
                (self.split_window(&q, &k_all, &v_all, w, ctx.opts)?, None)
            }
        };
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

    /// One decode step of `n` sequences at once, each with its own cache: x (n, 1, d) ->
    /// (n, 1, nh*hd). The projections run row by row back to back (`layers::matmul_rows`);
    /// rotary embedding uses each row's own position (`cos`, `sin` are (n, 1, hd/2)); each row
    /// then attends over its own cache, whose length may differ.
    pub fn heads_step_batch(
        &self,
        rope: &Rope,
        cos: &Tensor,
        sin: &Tensor,
        x: &Tensor,
        kvs: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (n, t, _) = x.dims3()?;
        if t != 1 || kvs.len() != n {
            bail!(
                "a batched decode step takes one token per sequence: got {t} tokens for {n} rows \
                 and {} caches",
                kvs.len()
            );
        }
        if self.window.is_some() {
            bail!("attention restricted to a window has no batched decode step");
        }
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let opts = ForwardOptions::default();
        let q = self
            .q_proj
            .forward_rows(x)?
            .reshape((n, 1, nh, hd))?
            .transpose(1, 2)?; // (n, nh, 1, hd)
        let k = self
            .k_proj
            .forward_rows(x)?
            .reshape((n, 1, nkv, hd))?
            .transpose(1, 2)?; // (n, nkv, 1, hd)
        let v = self
            .v_proj
            .forward_rows(x)?
            .reshape((n, 1, nkv, hd))?
            .transpose(1, 2)?; // (n, nkv, 1, hd)
        let q = rope.apply(&q, cos, sin, &opts)?;
        let k = rope.apply(&k, cos, sin, &opts)?;
        let mut outs = Vec::with_capacity(n);
        for (i, kv) in kvs.iter_mut().enumerate() {
            let (k_all, v_all) = kv.append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?; // (1, nkv, s_i, hd)
            let (o, _) = attention(AttentionInputs {
                q: &q.narrow(0, i, 1)?,
                k: &k_all,
                v: &v_all,
                opts: &opts,
                want_probs: false,
            })?; // (1, nh, 1, hd)
            outs.push(o);
        }
        let o = Tensor::cat(&outs, 0)?; // (n, nh, 1, hd)
        Ok(o.transpose(1, 2)?.reshape((n, 1, nh * hd))?) // (n, 1, nh*hd)
    }

    /// Attention with the groups of `w` restricted to sinks + window and the others unrestricted:
    /// q (b, nh, t, hd), k / v (b, nkv, s, hd) -> (b, nh, t, hd). The two sets of heads are
    /// gathered apart and put back in head order; the gather copies the cache's keys and values
    /// once per call, acceptable for measuring a plan's ceiling, not an inference path.
    fn split_window(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        w: &KvWindow,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let g = self.n_heads / self.n_kv_heads;
        if let Some(&bad) = w.groups.iter().find(|&&x| x >= self.n_kv_heads) {
            bail!(
                "window restriction names KV group {bad}, the layer has {}",
                self.n_kv_heads
            );
        }
        let free: Vec<usize> = (0..self.n_kv_heads)
            .filter(|x| !w.groups.contains(x))
            .collect();
        let heads = |gs: &[usize]| -> Vec<u32> {
            gs.iter()
                .flat_map(|&x| (x * g..(x + 1) * g).map(|h| h as u32))
                .collect()
        };
        let dev = q.device();
        let pick = |x: &Tensor, idx: &[u32]| -> Result<Tensor> {
            Ok(x.contiguous()?.index_select(&Tensor::new(idx, dev)?, 1)?)
        };
        let win_groups: Vec<u32> = w.groups.iter().map(|&x| x as u32).collect();
        let win_heads = heads(&w.groups);
        let (qw, kw, vw) = (
            pick(q, &win_heads)?,
            pick(k, &win_groups)?,
            pick(v, &win_groups)?,
        );
        let o_win = if opts.attention == AttentionImpl::Fast && dev.is_cpu() {
            crate::model::kernels::prefill_attention::prefill_attention(
                &qw,
                &kw,
                &vw,
                crate::model::kernels::prefill_attention::KeyRule {
                    window: Some((w.sinks, w.window)),
                    ..Default::default()
                },
            )?
        } else {
            windowed_attention(
                &qw,
                &kw.to_dtype(qw.dtype())?,
                &vw.to_dtype(qw.dtype())?,
                KeyLayout::default(),
                w.sinks,
                w.window,
                false,
            )?
        }; // (b, |win_heads|, t, hd)
        if free.is_empty() {
            return Ok(o_win);
        }
        let free_groups: Vec<u32> = free.iter().map(|&x| x as u32).collect();
        let free_heads = heads(&free);
        let (o_free, _) = attention(AttentionInputs {
            q: &pick(q, &free_heads)?,
            k: &pick(k, &free_groups)?,
            v: &pick(v, &free_groups)?,
            opts,
            want_probs: false,
        })?; // (b, |free_heads|, t, hd)
             // Back to head order: position of each head in [free heads..., window heads...].
        let order: Vec<u32> = free_heads.iter().chain(&win_heads).copied().collect();
        let mut inverse = vec![0u32; order.len()];
        for (i, &h) in order.iter().enumerate() {
            inverse[h as usize] = i as u32;
        }
        let both = Tensor::cat(&[o_free, o_win], 1)?;
        Ok(both.index_select(&Tensor::new(inverse.as_slice(), dev)?, 1)?)
    }
}
