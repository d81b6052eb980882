//! GGUF files for the tests, written the way llama.cpp writes them.

use super::fixture;
use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use recurformer::formats::config::ModelConfig;
use recurformer::formats::gguf::permute_rows;
use std::path::Path;

pub fn write_gguf(
    path: &Path,
    meta: &[(&str, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, &t)?;
    Ok(())
}

/// Writes the tiny Llama fixture as llama.cpp would: GGUF names, permuted W_q / W_k, metadata.
pub fn tiny_llama_as_gguf(path: &Path, dtype: GgmlDType) -> Result<()> {
    tiny_llama_gguf_with(path, dtype, vec![])
}

/// [`tiny_llama_as_gguf`] with `extra` metadata (a tokenizer, for example) appended.
pub fn tiny_llama_gguf_with(
    path: &Path,
    dtype: GgmlDType,
    extra: Vec<(&str, Value)>,
) -> Result<()> {
    let cfg = ModelConfig::from_hf_file(&fixture("tiny-llama").join("config.json"))?;
    let hf = candle_core::safetensors::load(
        fixture("tiny-llama").join("model.safetensors"),
        &Device::Cpu,
    )?;
    let mut tensors = vec![];
    let mut names: Vec<&String> = hf.keys().collect();
    names.sort();
    for name in names {
        let t = hf[name].to_dtype(candle_core::DType::F32)?;
        let gname = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            n => {
                let rest = n.strip_prefix("model.layers.").unwrap();
                let (l, m) = rest.split_once('.').unwrap();
                let g = match m {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("blk.{l}.{g}")
            }
        };
        let t = if gname.ends_with("attn_q.weight") {
            permute_rows(&t, cfg.num_attention_heads)?
        } else if gname.ends_with("attn_k.weight") {
            permute_rows(&t, cfg.num_key_value_heads)?
        } else {
            t
        };
        // llama.cpp keeps 1-D tensors (norms) in f32.
        let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gname, QTensor::quantize(&t, d)?));
    }
    let factor = match cfg.rope_scaling {
        Some(recurformer::formats::config::RopeScaling::Linear { factor }) => factor,
        _ => panic!("tiny-llama is expected to use linear rope scaling"),
    };
    let mut meta = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "llama.block_count",
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        (
            "llama.context_length",
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("llama.rope.scaling.type", Value::String("linear".into())),
        ("llama.rope.scaling.factor", Value::F32(factor as f32)),
    ];
    meta.extend(extra);
    write_gguf(path, &meta, &tensors)
}
