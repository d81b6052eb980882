//! Quantised weights at inference (issue 20): every linear layer of the decoder (q/k/v of the
//! kept and of the windowed heads, o_proj, the MLP) and the LM head can run on a quantised copy
//! of its weight through candle's quantised matmul (`candle_core::quantized::QMatMul`), the block
//! formats of GGML / llama.cpp (Q8_0: 32 weights share one f16 scale, 8.5 bits a weight; Q4_0:
//! 4.5 bits; the K-quants: super-blocks of 256). Decode reads every weight once per token, so
//! its speed follows the bytes read, which Q8_0 cuts to 0.27 of f32.
//!
//! The Mamba mixers' five projections (x, B, C, Δ, z) are stacked into one quantised matrix per
//! mixer (`MambaMixer::quantize`), which decode and prefill both read.
//!
//! What stays f32: the embedding table unless the weights are q8_0 (then the lookup reads a
//! q8_0 table, the LM head's own when tied: `drop_lm_head_f32`), the norms, the mixers' conv and
//! scan, and any matrix whose input size is not a multiple of
//! the format's block (e.g. the K-quants on a model with 576-wide layers); [`QuantSummary`] says
//! which. Activations are quantised per row by the kernel (to Q8_0 / Q8_K), as in llama.cpp.
//! Training never quantises: the f32 weights stay, and gradients flow through them only.

use crate::model::kernels::q8_gemv::QWeight;
use crate::model::llama::{DecoderLayer, Model};
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
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

/// Quantises layer `i`'s linear layers and its mixer's stacked decode-step projections to
/// `dtype`, adding to `s`; with `drop_f32`, frees the f32 copy of each weight that got a quantised
/// one ([`drop_layer_f32`]), adding the bytes to `s.freed`. Used on a whole model
/// ([`Model::quantize`]) and on each layer as it is loaded (`Model::load_hybrid_quantized`).
pub(crate) fn quantize_layer(
    i: usize,
    layer: &mut DecoderLayer,
    dtype: GgmlDType,
    drop_f32: bool,
    s: &mut QuantSummary,
) -> Result<()> {
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
    Ok(())
}

/// Frees the f32 LM head and embedding of a quantised model used only for inference and marks
/// the model inference-only. Returns the bytes freed.
///
/// The embedding: with q8_0 weights the lookup reads a q8_0 table ([`Model::embed_q`], rows
/// dequantised as needed, as llama.cpp's `get_rows` reads the GGUF's own table); with tied
/// embeddings that table is the quantised LM head, so the f32 table (113 MiB for SmolLM2-135M)
/// goes for nothing. With other formats, whose blocks we do not dequantise per row, it stays f32
/// (and so does a tied head's f32 copy, which is the same tensor).
pub(crate) fn drop_lm_head_f32(model: &mut Model) -> Result<usize> {
    let mut freed = 0;
    let head_q8 = match model.lm_head_q.as_ref().map(|w| &w.q) {
        Some(QMatMul::QTensor(q)) if q.dtype() == GgmlDType::Q8_0 => Some(q.clone()),
        _ => None,
    };
    if model.cfg.tie_word_embeddings {
        if let Some(q) = head_q8 {
            model.embed_q = Some(q);
            freed += placeholder(&mut model.embed_tokens)?;
            placeholder(&mut model.lm_head)?; // the same storage
        }
    } else {
        if model.lm_head_q.is_some() {
            freed += placeholder(&mut model.lm_head)?;
        }
        if head_q8.is_some() {
            let q = QTensor::quantize(&model.embed_tokens, GgmlDType::Q8_0)?;
            model.embed_q = Some(std::sync::Arc::new(q));
            freed += placeholder(&mut model.embed_tokens)?;
        }
    }
    model.inference_only = true;
    Ok(freed)
}

/// Rows `ids` of a q8_0 matrix (v, d), dequantised: (n, d). Each block of 32 values is one f16
/// scale and 32 signed bytes, value = scale × byte (GGML's `dequantize_row_q8_0`).
pub fn q8_0_rows(q: &QTensor, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
    const QK: usize = 32;
    const BLOCK_BYTES: usize = 34;
    if q.dtype() != GgmlDType::Q8_0 {
        bail!("q8_0 row lookup on a {:?} matrix", q.dtype());
    }
    let (v, d) = q.shape().dims2()?;
    if d % QK != 0 {
        bail!("q8_0 row lookup: rows of {d} values are not whole blocks of {QK}");
    }
    let data = q.data()?;
    let row_bytes = d / QK * BLOCK_BYTES;
    if data.len() != v * row_bytes {
        bail!(
            "q8_0 row lookup: storage holds {} bytes, expected {} for ({v}, {d})",
            data.len(),
            v * row_bytes
        );
    }
    let mut out = vec![0f32; ids.len() * d];
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(d)) {
        let id = id as usize;
        if id >= v {
            bail!("token id {id} is outside the vocabulary of {v}");
        }
        let row = &data[id * row_bytes..(id + 1) * row_bytes];
        for (blk, ob) in row.chunks_exact(BLOCK_BYTES).zip(o.chunks_exact_mut(QK)) {
            let scale = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            for (x, &b) in ob.iter_mut().zip(&blk[2..]) {
                *x = scale * (b as i8) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(out, (ids.len(), d), device)?)
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
            freed += drop_lm_head_f32(self)? + s.freed;
        }
        Ok((s, freed))
    }

    fn quantize_impl(&mut self, format: WeightFormat, drop_f32: bool) -> Result<QuantSummary> {
        let mut s = QuantSummary::default();
        let Some(dtype) = format.dtype() else {
            return Ok(s);
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            quantize_layer(i, layer, dtype, drop_f32, &mut s)?;
        }
        self.quantize_lm_head(dtype, &mut s)?;
        Ok(s)
    }

    /// Quantises the LM head to `dtype` (left f32, and named in `s`, when its input size is not
    /// a multiple of the block).
    pub(crate) fn quantize_lm_head(
        &mut self,
        dtype: GgmlDType,
        s: &mut QuantSummary,
    ) -> Result<()> {
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
        Ok(())
    }

    /// Frees the f32 copy of every weight that has a quantised copy ([`Model::quantize`]), for a
    /// model used only for inference from now on: forwards read the quantised copies, and only
    /// saving and training read the f32 ones. Each is replaced by a placeholder of the same shape
    /// holding a single value (a broadcast zero), so shapes, parameter counts and cache sizes stay
    /// as they were; the model is marked [`Model::inference_only`] and `save_checkpoint` refuses
    /// it. The embedding goes too when the LM head is q8_0 (the lookup then reads the q8_0
    /// table, [`Model::embed_q`]); otherwise it stays f32. Returns the bytes of f32 weights
    /// released.
    pub fn drop_f32_copies(&mut self) -> Result<usize> {
        let mut freed = 0;
        for layer in self.layers.iter_mut() {
            freed += drop_layer_f32(layer)?;
        }
        Ok(freed + drop_lm_head_f32(self)?)
    }

    /// Bytes of weights one decode step reads, each in the type it runs in: every linear layer
    /// (its quantised copy when there is one: blocks and scales, as stored), the mixers' stacked
    /// projections or their five f32 ones and their small f32 parameters (conv, Δ bias, A, D,
    /// norm), the norms, the LM head and one embedding row. With the cache bytes at a context,
    /// the bytes a step must bring from memory: `bench` divides the machine's measured memory
    /// bandwidth by their sum for the decode speed's physical limit (issue 20).
    pub fn decode_weight_bytes(&self) -> usize {
        // Candle's blocks; the tiled copy of `QWeight` (when there is one) holds the same
        // blocks and scales, and a step reads one or the other.
        let qbytes = |w: &QWeight| match &w.q {
            QMatMul::QTensor(t) => t.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        let lin = |l: &crate::model::layers::Linear| {
            let w = match &l.quant {
                Some(q) => qbytes(q),
                None => 4 * l.weight.elem_count(),
            };
            w + l.bias.as_ref().map_or(0, |b| 4 * b.elem_count())
        };
        let d = self.cfg.hidden_size;
        let mut total = 4 * d; // one embedding row (q8_0 when freed: fewer; kept as f32 here)
        for layer in &self.layers {
            total += layer
                .inference_linears()
                .into_iter()
                .map(lin)
                .sum::<usize>();
            total += 4
                * (layer.input_layernorm.weight.elem_count()
                    + layer.post_attention_layernorm.weight.elem_count());
            if let Some(mx) = &layer.mixer {
                let all: usize = mx.params().iter().map(|t| t.elem_count()).sum();
                let proj: usize = [&mx.x_proj, &mx.b_proj, &mx.c_proj, &mx.dt_proj, &mx.z_proj]
                    .iter()
                    .map(|t| t.elem_count())
                    .sum();
                total += 4 * (all - proj)
                    + match &mx.step_proj {
                        Some(q) => qbytes(q),
                        None => 4 * proj,
                    };
            }
        }
        total += 4 * self.norm.weight.elem_count();
        total += match &self.lm_head_q {
            Some(q) => qbytes(q),
            None => 4 * self.lm_head.elem_count(),
        };
        total
    }

    /// True when some forward runs on quantised weights ([`Model::quantize`]).
    pub fn is_quantized(&self) -> bool {
        self.lm_head_q.is_some() || self.layers.iter().any(|l| l.is_quantized())
    }
}
