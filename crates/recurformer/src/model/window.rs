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

/// Softmax attention of `q` (b, n, t, hd), queries at positions `offset..offset + t`, against the
/// keys `k`, `v` (b, nkv, s, hd) at positions `0..s` (s = offset + t), each query seeing only the
/// sinks and its recent window. Returns (b, n, t, hd).
pub fn windowed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sinks: usize,
    window: usize,
) -> Result<Tensor> {
    let (b, n, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if window == 0 {
        bail!("attention window 0: a query must see at least its own key");
    }
    if s < t || nkv == 0 || n % nkv != 0 {
        bail!("windowed attention: {n} query heads, {t} queries against {nkv} KV heads, {s} keys");
    }
    let g = n / nkv;
    let offset = s - t;
    let scale = 1.0 / (hd as f64).sqrt();
    // Query heads of one group are adjacent (head h reads KV head h / g): stack them as rows.
    let q = q.contiguous()?.reshape((b, nkv, g, t, hd))?;
    let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut start = 0;
    while start < t {
        let c = QUERY_BLOCK.min(t - start);
        let (p0, p1) = (offset + start, offset + start + c); // query positions p0..p1
                                                             // Keys this block can see: the sinks, then the recent span from the first query's window
                                                             // start to the last query (sinks that fall inside the span are taken from the span).
        let lo = (p0 + 1).saturating_sub(window).max(sinks.min(p0 + 1));
        let ns = sinks.min(lo); // sink keys below the span
        let (kb, vb) = if ns > 0 {
            (
                Tensor::cat(&[k.narrow(2, 0, ns)?, k.narrow(2, lo, p1 - lo)?], 2)?,
                Tensor::cat(&[v.narrow(2, 0, ns)?, v.narrow(2, lo, p1 - lo)?], 2)?,
            )
        } else {
            (k.narrow(2, lo, p1 - lo)?, v.narrow(2, lo, p1 - lo)?)
        };
        let positions: Vec<usize> = (0..ns).chain(lo..p1).collect();
        let keys = positions.len();
        let qc = q
            .narrow(3, start, c)?
            .contiguous()?
            .reshape((b, nkv, g * c, hd))?;
        let scores = (qc.matmul(&kb.contiguous()?.t()?)? * scale)?; // (b, nkv, g*c, keys)
        let mask = window_mask(p0, c, &positions, sinks, window, q.device())?; // (c, keys)
        let scores = scores
            .reshape((b, nkv, g, c, keys))?
            .broadcast_add(&mask)?
            .reshape((b, nkv, g * c, keys))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
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
            let fast = windowed_attention(&q, &k, &v, sinks, window)?;
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
        let w = windowed_attention(&q, &k, &v, 0, 40)?;
        let full = reference(&q, &k, &v, 0, 1 << 20)?;
        let err = (w - full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        // And a window of 1 without sinks copies each query's own value.
        let own = windowed_attention(&q, &k, &v, 0, 1)?;
        let v_rep = v
            .unsqueeze(2)?
            .broadcast_as((1, 2, 2, 40, 8))?
            .reshape((1, 4, 40, 8))?;
        let err = (own - v_rep)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }
}
