//! Quantised weights at inference (issue 20): every linear layer of the decoder (q/k/v of the
//! kept and of the windowed heads, o_proj, the MLP) and the LM head can run on a quantised copy
//! of its weight through candle's quantised matmul (`candle_core::quantized::QMatMul`), the block
//! formats of GGML / llama.cpp (Q8_0: 32 weights share one f16 scale, 8.5 bits a weight; Q4_0:
//! 4.5 bits; the K-quants: super-blocks of 256). Decode reads every weight once per token, so
//! its speed follows the bytes read, which Q8_0 cuts to 0.27 of f32.
//!
//! The Mamba mixers' five projections (x, B, C, Δ, z) are stacked into one quantised matrix per
//! mixer for the decode step (`MambaMixer::quantize`); prefill runs them in f32.
//!
//! What stays f32: the embedding lookup (a gather, not a matmul), the norms, the mixers' conv and
//! scan and their projections in prefill, and any matrix whose input size is not a multiple of
//! the format's block (e.g. the K-quants on a model with 576-wide layers); [`QuantSummary`] says
//! which. Activations are quantised per row by the kernel (to Q8_0 / Q8_K), as in llama.cpp.
//! Training never quantises: the f32 weights stay, and gradients flow through them only.

use crate::model::kernels::q8_gemv::QWeight;
use crate::model::llama::{DecoderLayer, Model};
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

/// The weight format of an inference run (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q5K => "q5_k",
            WeightFormat::Q6K => "q6_k",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match Self::ALL.iter().find(|f| f.name() == t) {
            Some(f) => Ok(*f),
            None => bail!(
                "unknown weight format {s:?}: expected one of {}",
                Self::ALL.map(|f| f.name()).join(", ")
            ),
        }
    }

    /// The GGML block type, None for f32.
    pub fn dtype(self) -> Option<GgmlDType> {
        match self {
            WeightFormat::F32 => None,
            WeightFormat::Q8_0 => Some(GgmlDType::Q8_0),
            WeightFormat::Q4_0 => Some(GgmlDType::Q4_0),
            WeightFormat::Q4K => Some(GgmlDType::Q4K),
            WeightFormat::Q5K => Some(GgmlDType::Q5K),
            WeightFormat::Q6K => Some(GgmlDType::Q6K),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`Model::quantize`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantSummary {
    /// Matrices now quantised, and their weights.
    pub quantized: usize,
    pub quantized_weights: usize,
    /// Matrices left in f32 because their input size is not a multiple of the block, by name.
    pub kept_f32: Vec<String>,
    /// Bytes of the matmul weights read per token: before (all f32) and after.
    pub bytes_f32: usize,
    pub bytes_after: usize,
    /// Bytes of f32 copies freed as the layers were quantised ([`Model::quantize_for_inference`];
    /// 0 for [`Model::quantize`]).
    pub freed: usize,
}

/// Bytes of `n` weights in `dtype` (whole blocks).
pub fn bytes_of(dtype: GgmlDType, n: usize) -> usize {
    n / dtype.block_size() * dtype.type_size()
}

/// Replaces `t` by a placeholder of the same shape holding one value (a broadcast zero); returns
/// the bytes the old tensor held.
fn placeholder(t: &mut Tensor) -> Result<usize> {
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    *t = Tensor::zeros((), t.dtype(), t.device())?.broadcast_as(t.shape())?;
    Ok(bytes)
}

/// [`Model::drop_f32_copies`] for one layer.
fn drop_layer_f32(layer: &mut DecoderLayer) -> Result<usize> {
    let mut freed = 0;
    let o_quantised = layer.o_proj_run_quantised();
    for (_, l) in layer.inference_linears_mut() {
        if l.quant.is_some() {
            freed += placeholder(&mut l.weight)?;
        }
    }
    if o_quantised {
        // The stored o_proj (for saving) is the quantised run copy reordered, or shares its
        // storage.
        placeholder(&mut layer.o_proj.weight)?;
    }
    if let Some(mx) = &mut layer.mixer {
        if mx.step_proj.is_some() {
            for t in [
                &mut mx.x_proj,
                &mut mx.b_proj,
                &mut mx.c_proj,
                &mut mx.dt_proj,
                &mut mx.z_proj,
            ] {
                freed += placeholder(t)?;
            }
        }
    }
    Ok(freed)
}

impl Model {
    /// Quantises every linear layer and the LM head to `format` for inference (a no-op for
    /// f32). The f32 weights are kept beside the quantised ones (checkpoints are written from
    /// them); forwards use the quantised copy.
    pub fn quantize(&mut self, format: WeightFormat) -> Result<QuantSummary> {
        self.quantize_impl(format, false)
    }

    /// [`Model::quantize`] for a model used only for inference from now on (`generate`, `eval`,
    /// `bench`): each layer's f32 copies are freed as soon as the layer is quantised
    /// ([`Model::drop_f32_copies`]), so memory never holds both copies of the whole model.
    /// Returns the summary and the bytes of f32 weights released.
    pub fn quantize_for_inference(
        &mut self,
        format: WeightFormat,
    ) -> Result<(QuantSummary, usize)> {
        let s = self.quantize_impl(format, true)?;
        let mut freed = 0;
        if s.quantized > 0 {
            if self.lm_head_q.is_some() && !self.cfg.tie_word_embeddings {
                freed += placeholder(&mut self.lm_head)?;
            }
            freed += s.freed;
            self.inference_only = true;
        }
        Ok((s, freed))
    }

    fn quantize_impl(&mut self, format: WeightFormat, drop_f32: bool) -> Result<QuantSummary> {
        let mut s = QuantSummary::default();
        let Some(dtype) = format.dtype() else {
            return Ok(s);
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, l) in layer.inference_linears_mut() {
                let n = l.weight.elem_count();
                s.bytes_f32 += 4 * n;
                if l.quantize(dtype)? {
                    s.quantized += 1;
                    s.quantized_weights += n;
                    s.bytes_after += bytes_of(dtype, n);
                } else {
                    s.kept_f32.push(format!("model.layers.{i}.{name}"));
                    s.bytes_after += 4 * n;
                }
            }
            // The mixer's decode-step projections, stacked into one matrix.
            if let Some(mx) = &mut layer.mixer {
                let n = mx.step_proj_weights();
                s.bytes_f32 += 4 * n;
                if mx.quantize(dtype)? {
                    s.quantized += 1;
                    s.quantized_weights += n;
                    s.bytes_after += bytes_of(dtype, n);
                } else {
                    s.kept_f32.push(format!("model.layers.{i}.mixer.step_proj"));
                    s.bytes_after += 4 * n;
                }
            }
            if drop_f32 {
                s.freed += drop_layer_f32(layer)?;
            }
        }
        let (v, d) = self.lm_head.dims2()?;
        s.bytes_f32 += 4 * v * d;
        if d % dtype.block_size() == 0 {
            let q = QTensor::quantize(&self.lm_head, dtype)?;
            self.lm_head_q = Some(QWeight::new(q)?);
            s.quantized += 1;
            s.quantized_weights += v * d;
            s.bytes_after += bytes_of(dtype, v * d);
        } else {
            s.kept_f32.push("lm_head".into());
            s.bytes_after += 4 * v * d;
        }
        Ok(s)
    }

    /// Frees the f32 copy of every weight that has a quantised copy ([`Model::quantize`]), for a
    /// model used only for inference from now on: forwards read the quantised copies, and only
    /// saving and training read the f32 ones. Each is replaced by a placeholder of the same shape
    /// holding a single value (a broadcast zero), so shapes, parameter counts and cache sizes stay
    /// as they were; the model is marked [`Model::inference_only`] and `save_checkpoint` refuses
    /// it. The embedding stays f32 (its lookup reads it; a tied LM head shares it, so dropping
    /// that head frees nothing). Returns the bytes of f32 weights released.
    pub fn drop_f32_copies(&mut self) -> Result<usize> {
        let mut freed = 0;
        for layer in self.layers.iter_mut() {
            freed += drop_layer_f32(layer)?;
        }
        if self.lm_head_q.is_some() && !self.cfg.tie_word_embeddings {
            freed += placeholder(&mut self.lm_head)?;
        }
        self.inference_only = true;
        Ok(freed)
    }

    /// True when some forward runs on quantised weights ([`Model::quantize`]).
    pub fn is_quantized(&self) -> bool {
        self.lm_head_q.is_some() || self.layers.iter().any(|l| l.is_quantized())
    }
}
