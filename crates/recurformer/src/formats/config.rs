//! Model configuration, normalised from either a Hugging Face `config.json` or GGUF metadata.
//!
//! We parse `config.json` ourselves instead of using candle-transformers' structs: those reject files
//! written by transformers 5, which moved the rope settings under `rope_parameters` and writes
//! `sliding_window: null` (see DESIGN.md, "Measured pitfalls").

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Upper bounds [`ModelConfig::validate`] puts on sizes (see there).
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_HIDDEN: usize = 1 << 18;
pub const MAX_INTERMEDIATE: usize = 1 << 20;
pub const MAX_VOCAB: usize = 1 << 23;

/// The decoder families this crate runs. Qwen2 is a Llama with q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How the rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors stored as a tensor (GGUF `rope_freqs.weight`), as llama.cpp does.
    Factors { factors: Vec<f64> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2, or Llama with `attention_bias: true`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks the relations between sizes that the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.num_key_value_heads == 0 {
            bail!(
                "config has {} layers, {} attention heads, {} KV heads: all must be positive",
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.head_dim == 0 || c.head_dim % 2 != 0 {
            bail!(
                "head_dim {} must be even and positive for rotary embeddings",
                c.head_dim
            );
        }
        if c.vocab_size == 0 || c.hidden_size == 0 || c.intermediate_size == 0 {
            bail!(
                "vocab_size {}, hidden_size {}, intermediate_size {}: all must be positive",
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size
            );
        }
        // Sizes far above any released model (Llama 3.1 405B: 126 layers, 128 heads, hidden 16384,
        // intermediate 53248, vocabulary 128256), so that a damaged or hostile config cannot make
        // the loader reserve per-layer or per-head memory before the weights are checked.
        for (name, v, max) in [
            ("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", c.num_attention_heads, MAX_HEADS),
            ("head_dim", c.head_dim, MAX_HEAD_DIM),
            ("hidden_size", c.hidden_size, MAX_HIDDEN),
            ("intermediate_size", c.intermediate_size, MAX_INTERMEDIATE),
            ("vocab_size", c.vocab_size, MAX_VOCAB),
        ] {
            if v > max {
                bail!("{name} is {v}, more than the supported maximum of {max}");
            }
        }
        for (name, v) in [
            ("rms_norm_eps", c.rms_norm_eps),
            ("rope_theta", c.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} is {v}, expected a positive finite number");
            }
        }
        let scaling_ok = match &c.rope_scaling {
            None => true,
            Some(RopeScaling::Linear { factor }) => factor.is_finite() && *factor > 0.0,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                ..
            }) => [factor, low_freq_factor, high_freq_factor]
                .iter()
                .all(|x| x.is_finite() && **x > 0.0),
            Some(RopeScaling::Factors { factors }) => {
                factors.iter().all(|x| x.is_finite() && *x > 0.0)
            }
        };
        if !scaling_ok {
            bail!(
                "rope scaling {:?} has a factor that is not a positive finite number",
                c.rope_scaling
            );
        }
        if let Some(RopeScaling::Factors { factors }) = &c.rope_scaling {
            if factors.len() != c.head_dim / 2 {
                bail!(
                    "rope_freqs has {} factors, expected head_dim/2 = {}",
                    factors.len(),
                    c.head_dim / 2
                );
            }
        }
        Ok(())
    }

    /// KV-cache bytes per token for all layers in f32 (K and V for every KV head).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = crate::formats::io::read_text(path, crate::formats::io::JSON_FILE_LIMIT)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let architecture = match model_type {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!(
                "model_type {other:?} is not supported (supported: llama, mistral, qwen2; \
                 architectures field: {})",
                v.get("architectures")
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            ),
        };
        if model_type == "mistral" {
            if let Some(w) = v.get("sliding_window").and_then(Value::as_u64) {
                let max_pos = get_usize(v, "max_position_embeddings").unwrap_or(0);
                if (w as usize) < max_pos {
                    bail!(
                        "sliding_window {w} is smaller than max_position_embeddings {max_pos}: \
                         sliding-window attention is not supported"
                    );
                }
            }
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            bail!("mlp_bias: true is not supported (Llama-family MLPs without biases only)");
        }
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = get_usize(v, "head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        // transformers 5 moves rope_theta and the scaling under `rope_parameters`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling_obj = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_obj {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_hidden_layers: req_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(v, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids: match v.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => vec![],
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` a Hugging Face loader would accept for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "model_type": self.architecture.name(),
            "architectures": [match self.architecture {
                Architecture::Llama => "LlamaForCausalLM",
                Architecture::Qwen2 => "Qwen2ForCausalLM",
            }],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("json! object");
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        let scaling = match &self.rope_scaling {
            None => None,
            Some(RopeScaling::Linear { factor }) => {
                Some(serde_json::json!({"rope_type": "linear", "factor": factor}))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => Some(serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            })),
            // Not expressible in transformers' schema; kept in our own field so we reload it exactly.
            Some(RopeScaling::Factors { factors }) => {
                Some(serde_json::json!({"rope_type": "factors", "factors": factors}))
            }
        };
        if let Some(s) = scaling {
            obj.insert("rope_scaling".into(), s);
        }
        v
    }
}

fn parse_rope_scaling(s: &Value) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f64> {
        s.get("factor")
            .and_then(Value::as_f64)
            .with_context(|| format!("rope scaling {kind:?} has no numeric `factor`"))
    };
    Ok(match kind {
        "default" | "none" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: s
                .get("low_freq_factor")
                .and_then(Value::as_f64)
                .context("llama3 rope scaling needs low_freq_factor")?,
            high_freq_factor: s
                .get("high_freq_factor")
                .and_then(Value::as_f64)
                .context("llama3 rope scaling needs high_freq_factor")?,
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .context("llama3 rope scaling needs original_max_position_embeddings")?
                as usize,
        }),
        "factors" => Some(RopeScaling::Factors {
            factors: s
                .get("factors")
                .and_then(Value::as_array)
                .context("rope scaling `factors` needs a `factors` array")?
                .iter()
                .map(|x| x.as_f64().context("rope factor is not a number"))
                .collect::<Result<_>>()?,
        }),
        other => bail!("rope scaling type {other:?} is not supported (supported: linear, llama3)"),
    })
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    match v.get(key) {
        Some(x) => x
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("field `{key}` is {x}, expected a non-negative integer")),
        None => bail!("missing field `{key}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    #[test]
    fn reads_both_rope_layouts() {
        let mut v4 = base();
        v4["rope_theta"] = 5e5.into();
        v4["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let mut v5 = base();
        v5["rope_parameters"] =
            serde_json::json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5});
        v5["sliding_window"] = Value::Null;
        let a = ModelConfig::from_hf_json(&v4).unwrap();
        let b = ModelConfig::from_hf_json(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 5e5);
        assert_eq!(a.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(a.head_dim, 2);
        // Round trip through the JSON we write.
        assert_eq!(ModelConfig::from_hf_json(&a.to_hf_json()).unwrap(), a);
    }

    #[test]
    fn rejects_unknown_things_with_names() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut v = base();
        v["model_type"] = "gpt2".into();
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("gpt2"), "{e}");
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("3") && e.contains("4"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }
}
