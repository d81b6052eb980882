//! The decoder's leaf modules, as in transformers' `modeling_llama.py`: linear layers, RMSNorm,
//! rotary embeddings ("rotate half" layout, with Llama-3 / linear scaling) and the SwiGLU MLP.
//! Field names equal the checkpoint's tensor names, so loading is one-to-one.

use crate::formats::config::{ModelConfig, RopeScaling};
use crate::formats::weights::Weights;
use crate::model::kernels::q8_gemv::QWeight;
use crate::model::options::ForwardOptions;
use anyhow::Result;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A quantised copy of `weight` that inference forwards use instead of it
    /// ([`crate::model::quant`]); None for f32 (always in training, which needs the gradients
    /// of the f32 path).
    pub quant: Option<QWeight>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            quant: None,
        }
    }

    /// Quantises the weight to `dtype` for inference. False (and nothing changes) when the input
    /// size is not a multiple of the type's block size.
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<bool> {
        let inp = self.weight.dim(1)?;
        if inp % dtype.block_size() != 0 {
            return Ok(false);
        }
        let q = QTensor::quantize(&self.weight, dtype)?;
        self.quant = Some(QWeight::new(q)?);
        Ok(true)
    }

    pub fn load(w: &Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // x: (.., in) -> (.., out), as one 2-D GEMM over all leading positions.
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        let y = match &self.quant {
            Some(q) => crate::model::kernels::q8_gemv::qmatmul(q, &x2)?,
            None => x2.matmul(&self.weight.t()?)?,
        }; // (rows, out)
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// `x W^T` for the few rows of a batched decode step: x (m, k), W (n, k) -> (m, n).
///
/// One matrix-vector product per row rather than one GEMM over all rows. candle's GEMM takes a
/// fast matrix-vector path for a single row but packs the weights for two or more: measured on
/// this 2-core machine, 576 x 1536 weights took 76 us for one row and 400 us for two (and the
/// LM head 5.7 ms for one row, 21-24 ms for two to four), so a batched step of 2-4 sequences ran
/// 2-5x slower than the same sequences one after another. Row by row, each extra row costs one
/// more read of weights that are then in the cache.
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    let wt = w.t()?;
    if m == 1 {
        return Ok(x.matmul(&wt)?);
    }
    let rows = (0..m)
        .map(|i| Ok(x.narrow(0, i, 1)?.matmul(&wt)?))
        .collect::<Result<Vec<_>>>()?; // m x (1, n)
    Ok(Tensor::cat(&rows, 0)?) // (m, n)
}

impl Linear {
    /// `forward` for the rows of a batched decode step ([`matmul_rows`]). A quantised weight takes
    /// the rows in one call: its kernel reads each weight block once per tile of rows.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        if self.quant.is_some() {
            return self.forward(x);
        }
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = matmul_rows(&x.reshape((rows, inp))?, &self.weight)?; // (rows, out)
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

    /// `forward` for the rows of a batched decode step (`Linear::forward_rows`).
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward_rows(x)?)?;
        self.down_proj
            .forward_rows(&(gate * self.up_proj.forward_rows(x)?)?)
    }
}
