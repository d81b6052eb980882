//! Per-sequence state of a (hybrid) model, kept outside the immutable model.
//!
//! Per layer: a KV cache for the attention heads the layer keeps, and room for the recurrent state
//! (conv + SSM) of a Mamba mixer replacing the other heads. The position of the whole cache is
//! the number of tokens it has seen; both parts always advance together (llama.cpp's hybrid memory
//! takes the min of both parts; here they cannot diverge because every forward updates every layer).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Element type of the keys and values a KV cache stores (`--kv`; DESIGN.md, "Inference
/// precision"). Keys and values are rounded to it once, when appended; attention reads them
/// widened to f32 (`model::kernels`), so scores, softmax and sums stay f32. The recurrent (conv,
/// SSM) state and the windowed heads' bounded cache ([`WindowKv`]) stay f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes a value; what the parity tests against transformers use.
    #[default]
    F32,
    /// 2 bytes a value (IEEE half, as llama.cpp's default cache).
    F16,
}

impl KvDtype {
    pub const ALL: [KvDtype; 2] = [KvDtype::F32, KvDtype::F16];

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match Self::ALL.iter().find(|d| d.name() == t) {
            Some(d) => Ok(*d),
            None => bail!(
                "unknown KV cache type {s:?}: expected one of {}",
                Self::ALL.map(|d| d.name()).join(", ")
            ),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        }
    }

    /// Bytes of one stored value.
    pub fn size(self) -> usize {
        self.dtype().size_in_bytes()
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Keys and values of the attention heads of one layer, preallocated and grown by doubling so
/// that appending a token does not copy the whole cache.
#[derive(Clone)]
pub struct KvCache {
    k: Option<Tensor>, // (b, n_kv, capacity, head_dim), in `dtype`
    v: Option<Tensor>,
    len: usize,
    capacity: usize,
    pub batch: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvCache {
    /// An f32 cache.
    pub fn new(batch: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self::new_typed(batch, n_kv_heads, head_dim, capacity, KvDtype::F32)
    }

    /// A cache storing keys and values as `dtype`.
    pub fn new_typed(
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: KvDtype,
    ) -> Self {
        KvCache {
            k: None,
            v: None,
            len: 0,
            capacity: capacity.max(1),
            batch,
            n_kv_heads,
            head_dim,
            dtype,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the keys and values held (in the cache's dtype), the figure the analytic
    /// formula predicts.
    pub fn bytes(&self) -> usize {
        2 * self.batch * self.n_kv_heads * self.len * self.head_dim * self.dtype.size()
    }

    /// Bytes allocated, including the unused tail of the preallocation.
    pub fn allocated_bytes(&self) -> usize {
        match &self.k {
            Some(_) => {
                2 * self.batch * self.n_kv_heads * self.capacity * self.head_dim * self.dtype.size()
            }
            None => 0,
        }
    }

    /// An independent copy of the keys and values held, with room for `capacity` tokens. The
    /// buffers are written in place by `append`, so a plain `clone` would share them: appending
    /// to the clone would overwrite what the original appends next.
    pub fn fork(&self, capacity: usize) -> Result<KvCache> {
        let mut c = KvCache::new_typed(
            self.batch,
            self.n_kv_heads,
            self.head_dim,
            capacity.max(self.len),
            self.dtype,
        );
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            if self.len > 0 {
                c.append(&k.narrow(2, 0, self.len)?, &v.narrow(2, 0, self.len)?)?;
            }
        }
        Ok(c)
    }

    /// Appends `k`, `v` of shape (b, n_kv, t, head_dim), rounded to the cache's dtype, and returns
    /// views of all keys and values so far, (b, n_kv, len, head_dim), in that dtype: attention
    /// over them sees the new tokens exactly as later steps will.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        // An f32 setting stores what it is given (f64 in gradient checks), as before dtypes.
        let dt = match self.dtype {
            KvDtype::F16 => DType::F16,
            KvDtype::F32 => k.dtype(),
        };
        let (k, v) = (&k.to_dtype(dt)?, &v.to_dtype(dt)?);
        if (b, h, d) != (self.batch, self.n_kv_heads, self.head_dim) {
            bail!(
                "KV append of shape {:?} into a cache for batch {}, {} KV heads of {}",
                k.dims(),
                self.batch,
                self.n_kv_heads,
                self.head_dim
            );
        }
        let needed = self.len + t;
        if self.k.is_none() || needed > self.capacity {
            let mut cap = self.capacity;
            while cap < needed {
                cap *= 2;
            }
            let nk = Tensor::zeros((b, h, cap, d), dt, k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), dt, k.device())?;
            if let (Some(ok), Some(ov)) = (&self.k, &self.v) {
                if self.len > 0 {
                    nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.k = Some(nk);
            self.v = Some(nv);
            self.capacity = cap;
        }
        let (ck, cv) = (
            self.k.as_ref().expect("allocated above"),
            self.v.as_ref().expect("allocated above"),
        );
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((ck.narrow(2, 0, self.len)?, cv.narrow(2, 0, self.len)?))
    }
}

/// Keys and values of a layer's windowed heads (`model::window::LocalAttention`): the first
/// `sinks` positions and the `window - 1` most recent ones, the keys the next query can see besides
/// its own. Its size is bounded by `sinks + window - 1` tokens whatever the context length.
#[derive(Clone)]
pub struct WindowKv {
    /// Sink keys / values, positions 0..ns (ns <= sinks), (b, nkv, ns, hd).
    sink: Option<(Tensor, Tensor)>,
    /// Recent keys / values, contiguous positions ending at `seen`, (b, nkv, nr, hd).
    recent: Option<(Tensor, Tensor)>,
    /// Tokens seen so far.
    pub seen: usize,
    pub sinks: usize,
    pub window: usize,
}

impl WindowKv {
    pub fn new(sinks: usize, window: usize) -> Self {
        WindowKv {
            sink: None,
            recent: None,
            seen: 0,
            sinks,
            window,
        }
    }

    fn rows(x: &Option<(Tensor, Tensor)>) -> usize {
        x.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Bytes of the keys and values held (always f32: bounded and small, see [`KvDtype`]).
    pub fn bytes(&self) -> usize {
        [&self.sink, &self.recent]
            .iter()
            .filter_map(|x| x.as_ref())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }

    /// Appends the new keys / values `k`, `v` (b, nkv, t, hd) and returns every key the new
    /// queries may need with its layout (sinks, then contiguous positions up to the new ones),
    /// then keeps only the sinks and the `window - 1` most recent positions.
    pub fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor, crate::model::window::KeyLayout)> {
        let t = k.dim(2)?;
        let ns = Self::rows(&self.sink);
        let nr = Self::rows(&self.recent);
        let first_pos = self.seen - nr;
        let cat = |parts: Vec<&Tensor>| -> Result<Tensor> {
            Ok(if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 2)?
            })
        };
        let mut ks: Vec<&Tensor> = Vec::with_capacity(3);
        let mut vs: Vec<&Tensor> = Vec::with_capacity(3);
        for (ck, cv) in [&self.sink, &self.recent].into_iter().flatten() {
            ks.push(ck);
            vs.push(cv);
        }
        ks.push(k);
        vs.push(v);
        let (all_k, all_v) = (cat(ks)?, cat(vs)?);
        // Rows: the sinks (positions 0..ns), then contiguous positions first_pos.. (the recent
        // part, then the new keys). While the sinks are incomplete the recent part is empty and
        // first_pos = ns, so the run continues the sinks.
        let layout = crate::model::window::KeyLayout {
            sink_rows: ns,
            first_pos,
        };
        let row = |pos: usize| {
            if pos < ns {
                pos
            } else {
                ns + (pos - first_pos)
            }
        };
        // Keep the positions below `sinks` and the last window - 1 positions above them.
        let end = self.seen + t;
        let keep_sinks = self.sinks.min(end);
        if keep_sinks > ns {
            // Positions ns..keep_sinks are new keys right after the sink rows (first_pos = ns).
            self.sink = Some((
                all_k.narrow(2, 0, keep_sinks)?.contiguous()?,
                all_v.narrow(2, 0, keep_sinks)?.contiguous()?,
            ));
        }
        let recent_lo = (end + 1).saturating_sub(self.window).max(keep_sinks);
        self.recent = if recent_lo < end {
            Some((
                all_k
                    .narrow(2, row(recent_lo), end - recent_lo)?
                    .contiguous()?,
                all_v
                    .narrow(2, row(recent_lo), end - recent_lo)?
                    .contiguous()?,
            ))
        } else {
            None
        };
        self.seen = end;
        Ok((all_k, all_v, layout))
    }
}

/// Recurrent state of a Mamba mixer: the last (kernel-1) conv inputs and the SSM state.
#[derive(Clone)]
pub struct RecurrentState {
    /// (b, conv_channels, kernel - 1)
    pub conv: Tensor,
    /// (b, n_heads, head_dim, state_size), f32
    pub ssm: Tensor,
}

impl RecurrentState {
    pub fn bytes(&self) -> usize {
        (self.conv.elem_count() * self.conv.dtype().size_in_bytes())
            + (self.ssm.elem_count() * self.ssm.dtype().size_in_bytes())
    }
}

#[derive(Clone, Default)]
pub struct LayerCache {
    pub kv: Option<KvCache>,
    pub recurrent: Option<RecurrentState>,
    /// Keys and values of the windowed heads beside the mixer, when the layer has them.
    pub window: Option<WindowKv>,
}

/// Byte counts of a cache, split by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheBytes {
    pub kv: usize,
    pub recurrent: usize,
    /// Keys and values of windowed heads (sinks + recent window): bounded, like `recurrent`.
    pub window: usize,
}

impl CacheBytes {
    pub fn total(&self) -> usize {
        self.kv + self.recurrent + self.window
    }
}

#[derive(Clone)]
pub struct HybridCache {
    pub layers: Vec<LayerCache>,
    /// Tokens seen so far: the position of the next token.
    pub seq_len: usize,
    pub device: Device,
}

impl HybridCache {
    pub fn new(layers: Vec<LayerCache>, device: Device) -> Self {
        HybridCache {
            layers,
            seq_len: 0,
            device,
        }
    }

    pub fn bytes(&self) -> CacheBytes {
        let mut b = CacheBytes::default();
        for l in &self.layers {
            if let Some(kv) = &l.kv {
                b.kv += kv.bytes();
            }
            if let Some(r) = &l.recurrent {
                b.recurrent += r.bytes();
            }
            if let Some(w) = &l.window {
                b.window += w.bytes();
            }
        }
        b
    }

    /// A snapshot that continues independently of this cache, with KV room for `capacity`
    /// tokens: the keys and values copied, the recurrent and window states shared (they are
    /// replaced, never written in place, when a forward advances them). Restoring it and feeding
    /// the rest of a text gives the logits of a fresh prefill of the whole text; a recurrent
    /// state cannot be rolled back, so a snapshot is only good at exactly its own position.
    pub fn fork(&self, capacity: usize) -> Result<HybridCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    kv: l.kv.as_ref().map(|k| k.fork(capacity)).transpose()?,
                    recurrent: l.recurrent.clone(),
                    window: l.window.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HybridCache {
            layers,
            seq_len: self.seq_len,
            device: self.device.clone(),
        })
    }

    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.kv.as_ref().map_or(0, |k| k.allocated_bytes())
                    + l.recurrent.as_ref().map_or(0, |r| r.bytes())
                    + l.window.as_ref().map_or(0, |w| w.bytes())
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_grows_and_keeps_contents() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2, 3, 2);
        let mut all_k = vec![];
        for step in 0..5 {
            let t = 1 + step % 2;
            let k = Tensor::rand(0f32, 1., (1, 2, t, 3), &dev)?;
            let v = (&k * 2.)?;
            let (ck, cv) = c.append(&k, &v)?;
            all_k.push(k);
            let expect = Tensor::cat(&all_k, 2)?;
            assert_eq!(ck.dims(), expect.dims());
            assert_eq!(
                ck.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
                expect.flatten_all()?.to_vec1::<f32>()?
            );
            let d = (cv - (expect * 2.)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
        }
        assert_eq!(c.len(), 1 + 2 + 1 + 2 + 1);
        assert_eq!(c.bytes(), 2 * 2 * 7 * 3 * 4);
        assert!(c.allocated_bytes() >= c.bytes());
        assert!(c
            .append(
                &Tensor::zeros((1, 3, 1, 3), DType::F32, &dev)?,
                &Tensor::zeros((1, 3, 1, 3), DType::F32, &dev)?
            )
            .is_err());
        Ok(())
    }

    #[test]
    fn an_f16_cache_stores_rounded_values_at_half_the_bytes() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new_typed(1, 2, 4, 1, KvDtype::F16);
        let k = Tensor::new(&[1.0f32, 1.0 + 1e-4, 65504.0, -3.25], &dev)?.reshape((1, 1, 1, 4))?;
        let k = k.broadcast_as((1, 2, 3, 4))?.contiguous()?;
        let (ck, cv) = c.append(&k, &(&k * 0.5)?)?;
        assert_eq!((ck.dtype(), cv.dtype()), (DType::F16, DType::F16));
        // 1 + 1e-4 is not an f16: it is stored as 1.0 (the f16 step near 1 is 2^-10).
        let back = ck.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&back[..4], &[1.0, 1.0, 65504.0, -3.25]);
        assert_eq!(c.bytes(), 2 * 2 * 3 * 4 * 2);
        assert_eq!(c.bytes() * 2, {
            let mut f = KvCache::new(1, 2, 4, 1);
            f.append(&k, &k)?;
            f.bytes()
        });
        // A fork keeps the dtype and the contents.
        let f = c.fork(8)?;
        assert_eq!(f.dtype, KvDtype::F16);
        assert_eq!(f.bytes(), c.bytes());
        assert_eq!(KvDtype::parse("F16")?, KvDtype::F16);
        let e = KvDtype::parse("q4").unwrap_err().to_string();
        assert!(e.contains("\"q4\"") && e.contains("f32, f16"), "{e}");
        Ok(())
    }
}
