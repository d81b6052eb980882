//! Saving a model as a Hugging Face-style checkpoint directory (a RecurFormer's or a base model's):
//! - `config.json`: the base configuration plus, for a hybrid, the `recurformer` section (plan,
//!   mixer hyper-parameters, initialisation, provenance; see `model::hybrid`);
//! - `model.safetensors`: the base weights with the replaced heads' q/k/v rows removed, o_proj, the
//!   MLPs and norms unchanged, and the mixer tensors under `model.layers.{l}.mixer.*`;
//! - `tokenizer.json` (+ `tokenizer_config.json` with the chat template);
//! - for a hybrid, `configuration_recurformer.py` and `modeling_recurformer.py`, the PyTorch
//!   implementation of `python/recurformer_hf/`, with an `auto_map` in config.json pointing at them,
//!   so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the checkpoint
//!   (DESIGN.md, "Interoperability"; issue 23). The Rust loader ignores both.
//!
//! `checkpoint::loader` reads it back.

use crate::formats::config::ModelConfig;
use crate::formats::io;
use crate::formats::tokenizer::Tokenizer;
use crate::model::hybrid::RecurformerSection;
use crate::model::layers::Linear;
use crate::model::llama::Model;
use anyhow::{Context, Result};
use candle_core::Tensor;
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

/// The transformers configuration file copied into every RecurFormer checkpoint.
pub const HF_CONFIGURATION_PY: &str =
    include_str!("../../../../python/recurformer_hf/configuration_recurformer.py");
/// The transformers modeling file copied into every RecurFormer checkpoint.
pub const HF_MODELING_PY: &str =
    include_str!("../../../../python/recurformer_hf/modeling_recurformer.py");

/// The remote-code files of a RecurFormer checkpoint: (file name, contents).
pub const HF_CODE_FILES: [(&str, &str); 2] = [
    ("configuration_recurformer.py", HF_CONFIGURATION_PY),
    ("modeling_recurformer.py", HF_MODELING_PY),
];

/// config.json's `auto_map`: the classes transformers loads with `trust_remote_code=True`.
pub fn hf_auto_map() -> serde_json::Value {
    serde_json::json!({
        "AutoConfig": "configuration_recurformer.RecurformerConfig",
        "AutoModel": "modeling_recurformer.RecurformerModel",
        "AutoModelForCausalLM": "modeling_recurformer.RecurformerForCausalLM",
    })
}

/// The config.json of a model: the base configuration plus, for a hybrid, the `recurformer` section
/// and the `auto_map` of its transformers code.
pub fn config_json(
    cfg: &ModelConfig,
    section: Option<&RecurformerSection>,
) -> Result<serde_json::Value> {
    let mut v = cfg.to_hf_json();
    if let Some(s) = section {
        let obj = v.as_object_mut().expect("config is an object");
        obj.insert("recurformer".into(), serde_json::to_value(s)?);
        obj.insert("auto_map".into(), hf_auto_map());
    }
    Ok(v)
}

/// Writes the files of a checkpoint (config.json, model.safetensors, the tokenizer) into the
/// existing directory `dir`.
pub fn write_checkpoint_files(m: &Model, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    if m.inference_only {
        anyhow::bail!(
            "cannot save {}: this model's f32 weights were freed for inference \
             (Model::drop_f32_copies); save from a model loaded without --weights",
            dir.display()
        );
    }
    let cfg = config_json(&m.cfg, m.recurformer.as_ref())?;
    io::write_file(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    if m.recurformer.is_some() {
        for (name, text) in HF_CODE_FILES {
            io::write_file(&dir.join(name), text.as_bytes())?;
        }
    }
    io::write_safetensors(&named_tensors(m), &dir.join("model.safetensors"))?;
    if let Some(t) = tokenizer {
        t.save_hf(dir)?;
    }
    Ok(())
}

/// Writes a self-contained checkpoint directory atomically: everything goes to a temporary sibling
/// directory that is renamed over `dir` only once complete. On failure (a full disk, say) the
/// temporary directory is removed and a checkpoint already at `dir` is untouched.
pub fn save_checkpoint(m: &Model, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    replace_dir_with(dir, "tmp", |tmp| write_checkpoint_files(m, tokenizer, tmp))
}

/// Builds the new content of the directory `dir` with `fill` in a staging sibling
/// (`.{name}.{tag}{pid}`), then swaps it in: `dir` is moved aside, the staging directory renamed
/// to `dir`, the old one removed. If `fill` fails, the staging directory is removed and `dir` is
/// left as it was; if the swap fails halfway, the old directory is moved back.
pub fn replace_dir_with(
    dir: &Path,
    tag: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(".{name}.{tag}{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the stale {}", staging.display()))?;
    }
    let filled = std::fs::create_dir_all(&staging)
        .with_context(|| format!("creating {}", staging.display()))
        .and_then(|_| fill(&staging))
        .and_then(|_| io::sync_dir(&staging));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&staging);
        let kept = if dir.exists() {
            format!("{} is unchanged", dir.display())
        } else {
            format!("{} was not created", dir.display())
        };
        return Err(e.context(format!(
            "saving {}: nothing written is left behind, {kept}",
            dir.display()
        )));
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old{}", std::process::id()));
        if old.exists() {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the stale {}", old.display()))?;
        }
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e).with_context(|| format!("moving the previous {} aside", dir.display()));
        }
        if let Err(e) = std::fs::rename(&staging, dir) {
            let back = std::fs::rename(&old, dir);
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e).with_context(|| {
                format!(
                    "renaming {} to {} ({})",
                    staging.display(),
                    dir.display(),
                    match back {
                        Ok(()) => "the previous one is back in place".to_string(),
                        Err(b) => format!("the previous one is at {}: {b}", old.display()),
                    }
                )
            });
        }
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing the previous {}", old.display()))?;
    } else {
        std::fs::rename(&staging, dir)
            .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))?;
    }
    io::sync_dir(parent)
}
