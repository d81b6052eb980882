//! Per-sequence state of a (hybrid) model, kept outside the immutable model.
//!
//! Per layer: a KV cache for the attention heads the layer keeps, and room for the recurrent state
//! (conv + SSM) of a Mamba mixer replacing the other heads. The position of the whole cache is
//! the number of tokens it has seen; both parts always advance together (llama.cpp's hybrid memory
//! takes the min of both parts; here they cannot diverge because every forward updates every layer).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of the attention heads of one layer, preallocated and grown by doubling so
/// that appending a token does not copy the whole cache.
#[derive(Clone)]
pub struct KvCache {
    k: Option<Tensor>, // (b, n_kv, capacity, head_dim)
    v: Option<Tensor>,
    len: usize,
    capacity: usize,
    pub batch: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCache {
    pub fn new(batch: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCache {
            k: None,
            v: None,
            len: 0,
            capacity: capacity.max(1),
            batch,
            n_kv_heads,
            head_dim,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the keys and values held (f32), the figure the analytic formula predicts.
    pub fn bytes(&self) -> usize {
        2 * self.batch * self.n_kv_heads * self.len * self.head_dim * 4
    }

    /// Bytes allocated, including the unused tail of the preallocation.
    pub fn allocated_bytes(&self) -> usize {
        match &self.k {
            Some(_) => 2 * self.batch * self.n_kv_heads * self.capacity * self.head_dim * 4,
            None => 0,
        }
    }

    /// Appends `k`, `v` of shape (b, n_kv, t, head_dim) and returns views of all keys and values
    /// so far, (b, n_kv, len, head_dim).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
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
            let nk = Tensor::zeros((b, h, cap, d), DType::F32, k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), DType::F32, k.device())?;
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
}

/// Byte counts of a cache, split by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheBytes {
    pub kv: usize,
    pub recurrent: usize,
}

impl CacheBytes {
    pub fn total(&self) -> usize {
        self.kv + self.recurrent
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
        }
        b
    }

    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.kv.as_ref().map_or(0, |k| k.allocated_bytes())
                    + l.recurrent.as_ref().map_or(0, |r| r.bytes())
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
}
