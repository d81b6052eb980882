//! Saving a model as a Hugging Face-style checkpoint directory (a RecurFormer's or a base model's):
//! - `config.json`: the base configuration plus, for a hybrid, the `recurformer` section (plan,
//!   mixer hyper-parameters, initialisation, provenance; see `model::hybrid`);
//! - `model.safetensors`: the base weights with the replaced heads' q/k/v rows removed, o_proj, the
//!   MLPs and norms unchanged, and the mixer tensors under `model.layers.{l}.mixer.*`;
//! - `tokenizer.json` (+ `tokenizer_config.json` with the chat template).
//! `checkpoint::loader` reads it back.

use crate::formats::config::ModelConfig;
use crate::formats::tokenizer::Tokenizer;
use crate::model::hybrid::RecurformerSection;
use crate::model::layers::Linear;
use crate::model::llama::Model;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Every tensor of the model under its checkpoint name.
pub fn named_tensors(m: &Model) -> Vec<(String, Tensor)> {
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            m.embed_tokens.clone(),
        ),
        ("model.norm.weight".to_string(), m.norm.weight.clone()),
    ];
    if !m.cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), m.lm_head.clone()));
    }
    let lin = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
        out.push((format!("{name}.weight"), l.weight.clone()));
        if let Some(b) = &l.bias {
            out.push((format!("{name}.bias"), b.clone()));
        }
    };
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            l.input_layernorm.weight.clone(),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.clone(),
        ));
        if let Some(a) = &l.self_attn {
            lin(&mut out, format!("{p}.self_attn.q_proj"), &a.q_proj);
            lin(&mut out, format!("{p}.self_attn.k_proj"), &a.k_proj);
            lin(&mut out, format!("{p}.self_attn.v_proj"), &a.v_proj);
        }
        lin(&mut out, format!("{p}.self_attn.o_proj"), &l.o_proj);
        lin(&mut out, format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj);
        lin(&mut out, format!("{p}.mlp.up_proj"), &l.mlp.up_proj);
        lin(&mut out, format!("{p}.mlp.down_proj"), &l.mlp.down_proj);
        if let Some(mx) = &l.mixer {
            out.extend(mx.tensors(&format!("{p}.mixer")));
        }
        if let Some(la) = &l.local {
            out.extend(la.tensors(&format!("{p}.local_attn")));
        }
    }
    out
}

/// The config.json of a model: the base configuration plus, for a hybrid, the `recurformer` section.
pub fn config_json(
    cfg: &ModelConfig,
    section: Option<&RecurformerSection>,
) -> Result<serde_json::Value> {
    let mut v = cfg.to_hf_json();
    if let Some(s) = section {
        v.as_object_mut()
            .expect("config is an object")
            .insert("recurformer".into(), serde_json::to_value(s)?);
    }
    Ok(v)
}

/// Writes a self-contained checkpoint directory atomically: everything goes to a temporary sibling
/// directory that is renamed over `dir` only once complete.
pub fn save_checkpoint(m: &Model, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let cfg = config_json(&m.cfg, m.recurformer.as_ref())?;
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let tensors: HashMap<String, Tensor> = named_tensors(m).into_iter().collect();
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("model.safetensors").display()))?;
    if let Some(t) = tokenizer {
        t.save_hf(&tmp)?;
    }
    if dir.exists() {
        let old = parent.join(format!(
            ".{}.old{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dir, &old)
            .with_context(|| format!("moving the previous {} aside", dir.display()))?;
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    }
    Ok(())
}
