//! What makes a model a RecurFormer: the `recurformer` section of a hybrid checkpoint's
//! config.json (plan, mixer hyper-parameters, initialisation, provenance), as the decoder reads it
//! to build its layers. Converting a base model lives in `convert::init`, writing the checkpoint in
//! `checkpoint::save`.

use crate::formats::config::ModelConfig;
use crate::model::mamba::MambaConfig;
use crate::model::plan::Plan;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// config.json).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MambaSettings {
    pub state_size: usize,
    pub conv_kernel: usize,
    /// Windowed heads beside each mixer (`model::window::LocalAttention`); absent in checkpoints
    /// written before they existed, which have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalWindow>,
}

/// The keys the windowed heads beside a mixer see: the first `sinks` positions and the `window`
/// most recent ones (a query's own included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalWindow {
    pub sinks: usize,
    pub window: usize,
}

impl MambaSettings {
    pub fn mamba_config(&self, cfg: &ModelConfig, n_groups: usize) -> MambaConfig {
        MambaConfig {
            n_groups,
            group_size: cfg.group_size(),
            head_dim: cfg.head_dim,
            state_size: self.state_size,
            conv_kernel: self.conv_kernel,
            d_model: cfg.hidden_size,
        }
    }
}
