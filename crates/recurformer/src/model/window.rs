//! Attention restricted to the sink tokens plus a recent window (DESIGN.md, "Retrieval-aware
//! selection": the causal ceiling; issue 18). A query at position p sees the keys at positions
//! `j < sinks` and `p - window < j <= p`: the attention a head keeps when its KV cache holds only
//! its first `sinks` and last `window` tokens (StreamingLLM's "attention sinks" with a sliding
//! window, Xiao et al. 2023, arXiv:2309.17453, section 3.2; DuoAttention's streaming heads, Xiao et
//! al. 2024, arXiv:2410.10819). With `window` = the recency window of `analyze` this is, for a
//! recency-aware head, what the head does anyway; for a head that retrieves from far back it
//! removes exactly that. Run on the planned groups of the base model, it bounds what a mixer that
//! only reproduces local attention could keep of retrieval, before any training.
//!
//! Glossary: b batch, n query heads, nkv KV heads, g = n / nkv, t new queries, hd head dim.

use crate::formats::config::ModelConfig;
use crate::formats::weights::Weights;
use crate::model::attention::LayerCtx;
use crate::model::cache::WindowKv;
pub use crate::model::hybrid::LocalWindow;
use crate::model::layers::{Linear, Rope};
use crate::model::options::ForwardOptions;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// A restriction of some KV groups of one layer to sinks + a recent window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWindow {
    /// Local KV-head indices (within the layer's attention) that are restricted, ascending.
    pub groups: Vec<usize>,
    /// Keys at positions below this are always visible (attention sinks).
    pub sinks: usize,
    /// Recent keys visible to a query, its own position included (>= 1).
    pub window: usize,
}

/// Queries per block of [`windowed_attention`]: each block reads only its own span of keys, so
/// the work is O(t * (window + block)) rather than O(t^2).
const QUERY_BLOCK: usize = 128;

/// Where the rows of a key tensor sit in the sequence: rows `0..sink_rows` hold positions
/// `0..sink_rows` (the sinks a windowed cache keeps), rows from `sink_rows` on hold the contiguous
/// positions `first_pos..`. A full cache is `{ sink_rows: 0, first_pos: 0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLayout {
    pub sink_rows: usize,
    pub first_pos: usize,
}

/// Softmax attention of `q` (b, n, t, hd) against the keys `k`, `v` (b, nkv, s, hd) laid out as
/// `layout` says, the t queries being the last t positions, each query seeing only the sinks and
/// its recent window. `differentiable` uses the softmax that records a backward pass (training).
/// Returns (b, n, t, hd).
pub fn windowed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: KeyLayout,
    sinks: usize,
    window: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let (b, n, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if window == 0 {
        bail!("attention window 0: a query must see at least its own key");
    }
    let KeyLayout {
        sink_rows,
        first_pos,
    } = layout;
    if s < t + sink_rows || nkv == 0 || n % nkv != 0 || sink_rows > sinks.min(first_pos) {
        bail!(
            "windowed attention: {n} query heads, {t} queries against {nkv} KV heads, {s} keys \
             ({sink_rows} sink rows, first position {first_pos}, {sinks} sinks)"
        );
    }
    let g = n / nkv;
    let end = first_pos + (s - sink_rows); // one past the last position
    let row = |pos: usize| sink_rows + (pos - first_pos); // row of a contiguous position
    let scale = 1.0 / (hd as f64).sqrt();
    // Query heads of one group are adjacent (head h reads KV head h / g): stack them as rows.
    let q = q.contiguous()?.reshape((b, nkv, g, t, hd))?;
    let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut start = 0;
    while start < t {
        let c = QUERY_BLOCK.min(t - start);
        let (p0, p1) = (end - t + start, end - t + start + c); // query positions p0..p1
                                                               // Positions the block can see: the sinks, and the span from the first query's window
                                                               // start to the last query; within the contiguous rows both are ranges, merged if they
                                                               // touch, so no key is taken twice.
        let win_lo = (p0 + 1).saturating_sub(window).max(first_pos);
        let sink_hi = sinks.min(p1).max(first_pos); // contiguous sinks: first_pos..sink_hi
        let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(3); // (first row, rows)
        let mut positions: Vec<usize> = (0..sink_rows).collect();
        if sink_rows > 0 {
            ranges.push((0, sink_rows));
        }
        if sink_hi >= win_lo {
            ranges.push((row(first_pos), p1 - first_pos));
            positions.extend(first_pos..p1);
        } else {
            if sink_hi > first_pos {
                ranges.push((row(first_pos), sink_hi - first_pos));
                positions.extend(first_pos..sink_hi);
            }
            ranges.push((row(win_lo), p1 - win_lo));
            positions.extend(win_lo..p1);
        }
        let gather = |x: &Tensor| -> Result<Tensor> {
            let parts = ranges
                .iter()
                .map(|&(r, len)| x.narrow(2, r, len))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 2)?
            })
        };
        let (kb, vb) = (gather(k)?, gather(v)?);
        let keys = positions.len();
        let qc = q
            .narrow(3, start, c)?
            .contiguous()?
            .reshape((b, nkv, g * c, hd))?;
        let scores = (qc.matmul(&kb.contiguous()?.t()?)? * scale)?; // (b, nkv, g*c, keys)
        let mask = window_mask(p0, c, &positions, sinks, window, q.device())?; // (c, keys)
        let scores = scores
            .reshape((b, nkv, g, c, keys))?
            .broadcast_add(&mask.to_dtype(scores.dtype())?)?
            .reshape((b, nkv, g * c, keys))?;
        let probs = if differentiable {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let o = probs.matmul(&vb.contiguous()?)?; // (b, nkv, g*c, hd)
        outs.push(o.reshape((b, nkv, g, c, hd))?);
        start += c;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(&outs, 3)?
    };
    Ok(out.reshape((b, n, t, hd))?)
}

/// Additive mask (c, keys) for queries at positions p0..p0+c over keys at `positions`: 0 where a
/// key is a sink or within the query's window and not in its future, -inf elsewhere.
pub fn window_mask(
    p0: usize,
    c: usize,
    positions: &[usize],
    sinks: usize,
    window: usize,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..c)
        .flat_map(|i| {
            let p = p0 + i;
            positions.iter().map(move |&j| {
                if j <= p && (j < sinks || p - j < window) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (c, positions.len()), device)?)
}

/// Windowed heads beside a layer's mixer (issue 18, "a mixer that is exact where the heads are
/// exact"): the query heads the mixer replaced keep their own q/k/v and attend to the sinks plus a
/// recent window; their output is added to the mixer's in the replaced heads' o_proj slots. A
/// previous-token head, whose mass is on the last few keys, is then reproduced exactly, while the
/// mixer carries what lies beyond the window. The cache of these heads is bounded
/// ([`crate::model::cache::WindowKv`]), so the layer's state stays constant in the context length.
#[derive(Debug, Clone)]
pub struct LocalAttention {
    /// W_q rows of the replaced query heads, (n*hd, d); W_k, W_v rows of their groups.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub settings: LocalWindow,
}

impl LocalAttention {
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &ModelConfig,
        n_kv_heads: usize,
        settings: LocalWindow,
    ) -> Result<Self> {
        let (d, hd, g) = (cfg.hidden_size, cfg.head_dim, cfg.group_size());
        let bias = cfg.attention_bias;
        Ok(LocalAttention {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), n_kv_heads * g * hd, d, bias)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), n_kv_heads * hd, d, bias)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), n_kv_heads * hd, d, bias)?,
            n_heads: n_kv_heads * g,
            n_kv_heads,
            head_dim: hd,
            settings,
        })
    }

    /// The tensors under `prefix` (checkpoint names).
    pub fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, l) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
        ] {
            out.push((format!("{prefix}.{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{prefix}.{name}.bias"), b.clone()));
            }
        }
        out
    }

    /// q (b, n, t, hd) and k, v (b, nkv, t, hd) after rotary embedding; `proj` applies a linear
    /// layer (the training forward passes one that skips frozen weights' gradients).
    pub fn qkv(
        &self,
        x: &Tensor,
        rope: &Rope,
        cos_sin: (&Tensor, &Tensor),
        opts: &ForwardOptions,
        proj: &dyn Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (n, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = proj(&self.q_proj, x)?
            .reshape((b, t, n, hd))?
            .transpose(1, 2)?; // (b, n, t, hd)
        let k = proj(&self.k_proj, x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // (b, nkv, t, hd)
        let v = proj(&self.v_proj, x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // (b, nkv, t, hd)
        let q = rope.apply(&q, cos_sin.0, cos_sin.1, opts)?;
        let k = rope.apply(&k, cos_sin.0, cos_sin.1, opts)?;
        Ok((q, k, v.contiguous()?))
    }

    /// x (b, t, d) appended to `cache` -> the heads' outputs (b, t, n*hd), head order.
    pub fn forward(&self, ctx: &LayerCtx, x: &Tensor, cache: &mut WindowKv) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.qkv(x, ctx.rope, (ctx.cos, ctx.sin), ctx.opts, &|l, x| {
            l.forward(x)
        })?;
        let (k_all, v_all, layout) = cache.append(&k, &v)?;
        let o = self.attend(&q, &k_all, &v_all, layout, ctx.opts)?; // (b, n, t, hd)
        Ok(o.transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?) // (b, t, n*hd)
    }

    /// One decode step of `n` sequences, each with its own window cache: x (n, 1, d) ->
    /// (n, 1, heads*hd); `cos`, `sin` (n, 1, hd/2) hold each row's own position. The projections
    /// run row by row (`layers::matmul_rows`), the windowed attention per row.
    pub fn step_batch(
        &self,
        rope: &Rope,
        cos: &Tensor,
        sin: &Tensor,
        x: &Tensor,
        caches: &mut [&mut WindowKv],
    ) -> Result<Tensor> {
        let (n, t, _) = x.dims3()?;
        if t != 1 || caches.len() != n {
            bail!(
                "a batched decode step takes one token per sequence: got {t} tokens for {n} rows \
                 and {} window caches",
                caches.len()
            );
        }
        let opts = ForwardOptions::default();
        let (q, k, v) = self.qkv(x, rope, (cos, sin), &opts, &|l, x| l.forward_rows(x))?; // (n, heads, 1, hd), (n, nkv, 1, hd) x2
        let mut outs = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (k_all, v_all, layout) = cache.append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
            let qi = q.narrow(0, i, 1)?; // (1, heads, 1, hd)
            outs.push(self.attend(&qi, &k_all, &v_all, layout, &opts)?); // (1, heads, 1, hd)
        }
        let o = Tensor::cat(&outs, 0)?; // (n, heads, 1, hd)
        Ok(o.transpose(1, 2)?
            .reshape((n, 1, self.n_heads * self.head_dim))?) // (n, 1, heads*hd)
    }

    /// Windowed attention of q (b, n, t, hd) over the keys a [`WindowKv`] returned: the tiled
    /// kernel (`kernels::prefill_attention`, no score blocks) on the CPU's fast path, the graph of
    /// [`windowed_attention`] on the eager path (its reference) or another device.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: KeyLayout,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let LocalWindow { sinks, window } = self.settings;
        if opts.attention == crate::model::options::AttentionImpl::Fast && q.device().is_cpu() {
            use crate::model::kernels::prefill_attention::{prefill_attention, KeyRule};
            return Ok(prefill_attention(
                q,
                k,
                v,
                KeyRule {
                    window: Some((sinks, window)),
                    sink_rows: layout.sink_rows,
                    first_pos: layout.first_pos,
                },
            )?);
        }
        windowed_attention(q, k, v, layout, sinks, window, false)
    }

    /// Bytes the cache of these heads holds at most: `sinks + window - 1` tokens of keys and values.
    pub fn max_state_bytes(&self, batch: usize) -> usize {
        let LocalWindow { sinks, window } = self.settings;
        2 * batch * self.n_kv_heads * (sinks + window.saturating_sub(1)) * self.head_dim * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::causal_mask;
    use candle_core::{DType, D};

    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// The textbook computation: full score matrix, the causal mask plus the window rule.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sinks: usize,
        window: usize,
    ) -> Result<Tensor> {
        let (b, n, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let g = n / nkv;
        let rep = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, nkv, g, s, hd))?
                .reshape((b, n, s, hd))?)
        };
        let scores = (q.matmul(&rep(k)?.t()?)? / (hd as f64).sqrt())?;
        let positions: Vec<usize> = (0..s).collect();
        let mask = window_mask(s - t, t, &positions, sinks, window, &Device::Cpu)?;
        // The window mask never opens a key the causal mask closes.
        let both = (mask.clone() + causal_mask(t, s, s - t, &Device::Cpu)?)?;
        assert_eq!(both.to_vec2::<f32>()?, mask.to_vec2::<f32>()?);
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        Ok(p.matmul(&rep(v)?)?)
    }

    #[test]
    fn blocked_windowed_attention_matches_the_full_masked_computation() -> Result<()> {
        // Prefill (offset 0) longer than one query block, a decode step, and a chunk after a
        // cached prefix; windows shorter and longer than the sequence; with and without sinks.
        for (t, s, sinks, window) in [
            (300, 300, 4, 32),
            (300, 300, 0, 7),
            (1, 300, 4, 32),
            (50, 260, 4, 16),
            (20, 20, 4, 64),
            (9, 9, 4, 1),
        ] {
            let q = rand(&[1, 6, t, 8], 1)?;
            let k = rand(&[1, 2, s, 8], 2)?;
            let v = rand(&[1, 2, s, 8], 3)?;
            let fast = windowed_attention(&q, &k, &v, KeyLayout::default(), sinks, window, false)?;
            let slow = reference(&q, &k, &v, sinks, window)?;
            let err = (fast - slow)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert!(
                err < 1e-5,
                "t {t} s {s} sinks {sinks} window {window}: max error {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_window_covering_everything_is_plain_causal_attention() -> Result<()> {
        let (q, k, v) = (
            rand(&[1, 4, 40, 8], 4)?,
            rand(&[1, 2, 40, 8], 5)?,
            rand(&[1, 2, 40, 8], 6)?,
        );
        let w = windowed_attention(&q, &k, &v, KeyLayout::default(), 0, 40, false)?;
        let full = reference(&q, &k, &v, 0, 1 << 20)?;
        let err = (w - full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        // And a window of 1 without sinks copies each query's own value.
        let own = windowed_attention(&q, &k, &v, KeyLayout::default(), 0, 1, true)?;
        let v_rep = v
            .unsqueeze(2)?
            .broadcast_as((1, 2, 2, 40, 8))?
            .reshape((1, 4, 40, 8))?;
        let err = (own - v_rep)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }
}
