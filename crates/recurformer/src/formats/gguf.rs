//! GGUF checkpoints: configuration from metadata, tensors dequantised to f32 under Hugging Face
//! names, and the raw tokenizer metadata (built into a tokenizer in `tokenizer.rs`).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. The header is read and
//! checked by `gguf_read.rs`; tensor data is read and dequantised by candle's
//! `quantized::gguf_file`, given only entries that lie inside the file.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of W_q
//! and W_k of `llama` models so that each head's rotary pairs are interleaved (GPT-J style) instead
//! of split in halves (GPT-NeoX style, what Hugging Face uses). We undo that here, so the rest of the
//! code sees exactly the Hugging Face layout. `qwen2` is converted without the permutation.

use crate::formats::config::{Architecture, ModelConfig, RopeScaling};
use crate::formats::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// An opened GGUF file: header, metadata and tensor directory (tensor data is read on demand).
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

/// Quantisation types we dequantise on load. candle reads a few more; these are the ones tested.
const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

impl GgufFile {
    /// Reads the header; every length, shape and offset in it is checked against the file
    /// (`gguf_read.rs`).
    pub fn open(path: &Path) -> Result<Self> {
        let content = crate::formats::gguf_read::read_content(path)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => bail!(
                "{}: metadata {key} is {:?}, expected a string",
                self.path.display(),
                v.value_type()
            ),
        }
    }

    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.meta(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: i128 = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            other => bail!(
                "{}: metadata {key} is {:?}, expected an integer",
                self.path.display(),
                other.value_type()
            ),
        };
        if n < 0 {
            bail!(
                "{}: metadata {key} is {n}, expected a non-negative integer",
                self.path.display()
            );
        }
        Ok(Some(n as usize))
    }

    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.meta(key) {
            None => None,
            Some(Value::F32(x)) => Some(*x as f64),
            Some(Value::F64(x)) => Some(*x),
            Some(_) => self.meta_usize(key)?.map(|x| x as f64),
        })
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.meta(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .with_context(|| format!("{}: metadata key {key} is missing", self.path.display()))
    }

    pub fn architecture(&self) -> Result<Architecture> {
        let arch = self.meta_str("general.architecture")?.with_context(|| {
            format!(
                "{}: metadata general.architecture is missing",
                self.path.display()
            )
        })?;
        match arch {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => bail!(
                "{}: architecture {other:?} is not supported (supported: llama, qwen2)",
                self.path.display()
            ),
        }
    }

    /// The model configuration, from `<arch>.*` metadata keys as llama.cpp writes them.
    pub fn config(&self) -> Result<ModelConfig> {
        let architecture = self.architecture()?;
        let a = architecture.name();
        let key = |k: &str| format!("{a}.{k}");
        let hidden_size = self.req_usize(&key("embedding_length"))?;
        let num_attention_heads = self.req_usize(&key("attention.head_count"))?;
        let num_key_value_heads = self
            .meta_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        let head_dim = match self.meta_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        let vocab_size = match self.meta_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) => t.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .with_context(|| {
                        format!("{}: cannot tell the vocabulary size", self.path.display())
                    })?,
            },
        };
        let mut rope_scaling = match self.meta_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let factor = self
                    .meta_f64(&key("rope.scaling.factor"))?
                    .with_context(|| format!("{}: linear rope scaling without {}", self.path.display(), key("rope.scaling.factor")))?;
                Some(RopeScaling::Linear { factor })
            }
            Some(other) => bail!(
                "{}: rope scaling type {other:?} is not supported (supported: linear, llama3 via rope_freqs)",
                self.path.display()
            ),
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            // llama.cpp stores Llama-3 style scaling as per-frequency divisors.
            let t = self.tensor_f32("rope_freqs.weight")?;
            let factors: Vec<f64> = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|x| x as f64)
                .collect();
            rope_scaling = Some(RopeScaling::Factors { factors });
        }
        let eos = self
            .meta_usize("tokenizer.ggml.eos_token_id")?
            .map(|x| x as u32);
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: self.req_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.req_usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize(&key("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: architecture == Architecture::Qwen2
                || self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: self
                .meta_usize("tokenizer.ggml.bos_token_id")?
                .map(|x| x as u32),
            eos_token_ids: eos.into_iter().collect(),
        };
        cfg.validate()
            .with_context(|| format!("in {}", self.path.display()))?;
        Ok(cfg)
    }

    /// Reads one tensor and dequantises it to f32, shaped as PyTorch would (rows = outputs).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .with_context(|| format!("{}: tensor {name} is missing", self.path.display()))?;
        if !SUPPORTED.contains(&info.ggml_dtype) {
            bail!(
                "{}: tensor {name} has quantisation {:?}, which is not supported (supported: {:?})",
                self.path.display(),
                info.ggml_dtype,
                SUPPORTED
            );
        }
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let q = self
            .content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: reading tensor {name}: {e}", self.path.display()))?;
        q.dequantize(&Device::Cpu)
            .with_context(|| format!("{}: dequantising tensor {name}", self.path.display()))
    }

    /// All model tensors under Hugging Face names, each read, dequantised to f32 and (W_q / W_k)
    /// un-permuted when the model asks for it (`Weights::get`), so that the file's tensors are
    /// never all in f32 at once.
    pub fn weights(&self, cfg: &ModelConfig) -> Result<Weights> {
        let mut w = Weights::empty();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for gname in names {
            if gname == "rope_freqs.weight" {
                continue; // folded into the config's rope scaling
            }
            let hf = hf_name(gname).with_context(|| {
                format!(
                    "{}: tensor {gname} has no known Hugging Face counterpart",
                    self.path.display()
                )
            })?;
            let info = &self.content.tensor_infos[gname];
            if !SUPPORTED.contains(&info.ggml_dtype) {
                bail!(
                    "{}: tensor {gname} has quantisation {:?}, which is not supported (supported: {:?})",
                    self.path.display(),
                    info.ggml_dtype,
                    SUPPORTED
                );
            }
            let unpermute = if cfg.architecture != Architecture::Llama {
                None
            } else if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
                Some(cfg.num_attention_heads)
            } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            // What the reader needs, owned (candle's TensorInfo is not Clone).
            let info = TensorInfo {
                ggml_dtype: info.ggml_dtype,
                shape: info.shape.clone(),
                offset: info.offset,
            };
            let shape = info.shape.dims().to_vec();
            let (path, data_offset, gname) = (
                self.path.clone(),
                self.content.tensor_data_offset,
                gname.clone(),
            );
            let read: crate::formats::weights::ReadTensor = Box::new(move || {
                let mut f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let q = info.read(&mut f, data_offset, &Device::Cpu).map_err(|e| {
                    anyhow::anyhow!("{}: reading tensor {gname}: {e}", path.display())
                })?;
                let t = q
                    .dequantize(&Device::Cpu)
                    .with_context(|| format!("{}: dequantising tensor {gname}", path.display()))?;
                match unpermute {
                    Some(heads) => {
                        unpermute_rows(&t, heads).with_context(|| format!("un-permuting {gname}"))
                    }
                    None => Ok(t),
                }
            });
            w.insert_deferred(hf, shape, candle_core::DType::F32, &self.path, read)?;
        }
        Ok(w)
    }
}

/// Maps llama.cpp tensor names onto Hugging Face names.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    let module = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Inverse of llama.cpp's `permute(w, n_head)`: that function views the rows of one head as
/// (2, head_dim/2) and transposes them to (head_dim/2, 2); we view them as (head_dim/2, 2) and
/// transpose back. Works for weights `[out, in]` and biases `[out]`.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = *dims.first().context("a scalar has no rows to un-permute")?;
    if n_head == 0 || out % (2 * n_head) != 0 {
        bail!("{out} rows cannot be split into {n_head} heads of rotary pairs");
    }
    let half = out / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    let r = t
        .reshape((n_head, half, 2, rest))? // (heads, head_dim/2, 2, in): the GGUF interleaved order
        .transpose(1, 2)? // (heads, 2, head_dim/2, in): halves, as Hugging Face stores them
        .contiguous()?
        .reshape(dims)?;
    Ok(r)
}

/// Inverse of `unpermute_rows` (the permutation llama.cpp applies when converting); used in tests.
pub fn permute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let half = dims[0] / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((n_head, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_one_to_one() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_down.weight").unwrap(),
            "model.layers.3.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.1.ssm_a").is_none());
    }

    #[test]
    fn unpermute_inverts_permute() -> Result<()> {
        // 2 heads of dim 4, 3 inputs: row r of head h holds the value 100*h + r.
        let rows: Vec<f32> = (0..8)
            .flat_map(|r| (0..3).map(move |c| (r * 10 + c) as f32))
            .collect();
        let w = Tensor::from_vec(rows, (8, 3), &Device::Cpu)?;
        let p = permute_rows(&w, 2)?;
        // llama.cpp order within a head of dim 4: rows 0, 2, 1, 3 (pairs (0,2) and (1,3) adjacent).
        let first_col: Vec<f32> = p.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(first_col, vec![0., 20., 10., 30., 40., 60., 50., 70.]);
        let back = unpermute_rows(&p, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
