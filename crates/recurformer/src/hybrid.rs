//! RecurFormer checkpoints: converting a base model by a plan, and saving / loading the result.
//!
//! A hybrid checkpoint is a Hugging Face-style directory:
//! - `config.json`: the base configuration plus a `recurformer` section (plan, mixer
//!   hyper-parameters, initialisation, provenance);
//! - `model.safetensors`: the base weights with the replaced heads' q/k/v rows removed, o_proj, the
//!   MLPs and norms unchanged, and the mixer tensors under `model.layers.{l}.mixer.*`;
//! - `tokenizer.json` (+ `tokenizer_config.json` with the chat template).

use crate::config::ModelConfig;
use crate::llama::{Attention, DecoderLayer, HeadSplit, Linear, MambaSettings, Model};
use crate::mamba::{AttnSource, MambaMixer};
use crate::plan::{Plan, MIXER_CONV_KERNEL};
use crate::recency::RecencyReport;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT_VERSION: u32 = 1;

/// How the mixers were initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// From the replaced heads read as linear attention (DESIGN.md, "Initialisation").
    Attention,
    /// Standard Mamba initialisation (the ablation).
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub base_model: String,
    pub recency: Option<String>,
    pub plan_file: Option<String>,
    pub seed: u64,
    pub recurformer_version: String,
    /// Training stages applied since conversion (filled by `train`).
    #[serde(default)]
    pub training: Vec<serde_json::Value>,
}

/// The `recurformer` section of a hybrid checkpoint's config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecurformerSection {
    pub format_version: u32,
    pub plan: Plan,
    pub mixer: MambaSettings,
    pub init: Init,
    pub provenance: Provenance,
}

impl RecurformerSection {
    pub fn from_config_json(v: &serde_json::Value) -> Result<Option<Self>> {
        let Some(sec) = v.get("recurformer") else {
            return Ok(None);
        };
        let s: RecurformerSection = serde_json::from_value(sec.clone())
            .context("the `recurformer` section of config.json is malformed")?;
        if s.format_version != FORMAT_VERSION {
            bail!(
                "recurformer checkpoint format {} is not supported (expected {FORMAT_VERSION})",
                s.format_version
            );
        }
        Ok(Some(s))
    }
}

/// Rows `heads[i]*hd .. +hd` of a (rows, cols) weight or (rows,) bias, in the order given.
fn rows_of(t: &Tensor, heads: &[usize], hd: usize) -> Result<Tensor> {
    let idx: Vec<u32> = heads
        .iter()
        .flat_map(|&h| (h * hd..(h + 1) * hd).map(|r| r as u32))
        .collect();
    Ok(t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)?)
}

fn linear_rows(l: &Linear, heads: &[usize], hd: usize) -> Result<Linear> {
    Ok(Linear {
        weight: rows_of(&l.weight, heads, hd)?,
        bias: l.bias.as_ref().map(|b| rows_of(b, heads, hd)).transpose()?,
    })
}

/// What `convert` needs besides the base model.
pub struct ConvertOptions<'a> {
    pub plan: &'a Plan,
    pub recency: Option<&'a RecencyReport>,
    pub init: Init,
    pub seed: u64,
    pub provenance: Provenance,
}

/// Turns a base model into a RecurFormer following `plan`: kept heads keep their q/k/v rows, each
/// layer with replaced groups gets one mixer initialised from those groups' rows (or randomly).
pub fn convert(base: &Model, o: &ConvertOptions) -> Result<Model> {
    let cfg = &base.cfg;
    if base.recurformer.is_some() {
        bail!("the model is already a RecurFormer; convert its base model instead");
    }
    o.plan.validate(cfg)?;
    if let Some(r) = o.recency {
        if (r.num_layers, r.num_attention_heads, r.num_key_value_heads)
            != (
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
            )
        {
            bail!(
                "recency report is for {} layers x {} heads ({} KV), the model has {} x {} ({})",
                r.num_layers,
                r.num_attention_heads,
                r.num_key_value_heads,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
    }
    if o.init == Init::Attention && o.recency.is_none() && !o.plan.is_empty() {
        bail!("--init attention needs the recency report (--recency): it sets each mixer's decay and output scale");
    }
    let settings = MambaSettings {
        state_size: cfg.head_dim,
        conv_kernel: MIXER_CONV_KERNEL,
    };
    let hd = cfg.head_dim;
    let mut layers = Vec::with_capacity(base.layers.len());
    for (i, (bl, lp)) in base.layers.iter().zip(&o.plan.layers).enumerate() {
        let attn = bl
            .self_attn
            .as_ref()
            .context("base layer without attention")?;
        let split = HeadSplit {
            attention_heads: lp.attention_heads.clone(),
            mamba_heads: lp.mamba_heads.clone(),
        };
        let kept = if lp.attention_groups.is_empty() {
            None
        } else {
            Some(Attention {
                q_proj: linear_rows(&attn.q_proj, &lp.attention_heads, hd)?,
                k_proj: linear_rows(&attn.k_proj, &lp.attention_groups, hd)?,
                v_proj: linear_rows(&attn.v_proj, &lp.attention_groups, hd)?,
                n_heads: lp.attention_heads.len(),
                n_kv_heads: lp.attention_groups.len(),
                head_dim: hd,
            })
        };
        let mixer = if lp.mamba_groups.is_empty() {
            None
        } else {
            let mc = settings.mamba_config(cfg, lp.mamba_groups.len());
            Some(match o.init {
                Init::Random => {
                    MambaMixer::init_random(&mc, o.seed.wrapping_add(i as u64), &base.device)?
                }
                Init::Attention => {
                    let r = &o.recency.expect("checked above").layers[i];
                    let src = AttnSource {
                        q_rows: rows_of(&attn.q_proj.weight, &lp.mamba_heads, hd)?,
                        k_rows: rows_of(&attn.k_proj.weight, &lp.mamba_groups, hd)?,
                        v_rows: rows_of(&attn.v_proj.weight, &lp.mamba_groups, hd)?,
                        q_bias: attn
                            .q_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_heads, hd))
                            .transpose()?,
                        k_bias: attn
                            .k_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_groups, hd))
                            .transpose()?,
                        v_bias: attn
                            .v_proj
                            .bias
                            .as_ref()
                            .map(|b| rows_of(b, &lp.mamba_groups, hd))
                            .transpose()?,
                        distance: lp
                            .mamba_heads
                            .iter()
                            .map(|&h| r.heads[h].distance)
                            .collect(),
                        output_rms: lp
                            .mamba_heads
                            .iter()
                            .map(|&h| r.heads[h].output_rms)
                            .collect(),
                    };
                    MambaMixer::init_from_attention(&src, &mc)
                        .with_context(|| format!("initialising layer {i}'s mixer"))?
                }
            })
        };
        layers.push(DecoderLayer::with_split(bl, kept, mixer, split, hd)?);
    }
    let section = RecurformerSection {
        format_version: FORMAT_VERSION,
        plan: o.plan.clone(),
        mixer: settings,
        init: o.init,
        provenance: o.provenance.clone(),
    };
    Ok(Model {
        layers,
        recurformer: Some(section),
        ..base.clone()
    })
}

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

/// Bytes of the per-sequence state a model needs: KV per token (kept groups) and the constant
/// recurrent state, as the cache will hold them.
pub fn cache_bytes_per_token_and_state(m: &Model) -> (usize, usize) {
    let mut kv = 0;
    let mut state = 0;
    for l in &m.layers {
        if let Some(a) = &l.self_attn {
            kv += 2 * a.n_kv_heads * a.head_dim * 4;
        }
        if let Some(mx) = &l.mixer {
            state += mx.cfg.state_bytes(1);
        }
    }
    (kv, state)
}
