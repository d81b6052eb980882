//! Opens whatever a user points `--model` at: a Hugging Face checkpoint directory or a GGUF file.

use crate::formats::config::ModelConfig;
use crate::formats::gguf::GgufFile;
use crate::formats::tokenizer::Tokenizer;
use crate::formats::weights;
use crate::model::hybrid::RecurformerSection;
use crate::model::llama::Model;
use crate::model::quant::{QuantSummary, WeightFormat};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    HfDir,
    Gguf,
}

pub struct LoadedModel {
    pub model: Model,
    /// None for checkpoints without tokenizer files (the tiny test models).
    pub tokenizer: Option<Tokenizer>,
    pub format: SourceFormat,
    pub path: PathBuf,
}

impl LoadedModel {
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .with_context(|| format!("{} has no tokenizer (tokenizer.json)", self.path.display()))
    }
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(f.read(&mut magic)? == 4 && &magic == b"GGUF")
}

/// Reads only the configuration (cheap), for `info` and planning.
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        ModelConfig::from_hf_file(&path.join("config.json"))
    } else if path.is_file() && is_gguf(path)? {
        GgufFile::open(path)?.config()
    } else if !path.exists() {
        bail!("model path {} does not exist", path.display())
    } else {
        bail!(
            "{} is neither a checkpoint directory (config.json) nor a GGUF file",
            path.display()
        )
    }
}

pub fn load(path: &Path) -> Result<LoadedModel> {
    Ok(load_quantized(path, WeightFormat::F32)?.0)
}

/// [`load`] for inference with the linear layers, mixer projections and LM head in `format`,
/// each layer quantised as it is read ([`Model::load_hybrid_quantized`]): the f32 weights of the
/// whole model never coexist in memory. The model is inference-only (it cannot be saved or
/// trained) unless `format` is f32. Returns what was quantised and how many f32 bytes were freed.
pub fn load_quantized(path: &Path, format: WeightFormat) -> Result<(LoadedModel, QuantSummary)> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            bail!("{} is a directory without config.json", path.display());
        }
        let cfg = ModelConfig::from_hf_file(&cfg_path)?;
        let text = crate::formats::io::read_text(&cfg_path, crate::formats::io::JSON_FILE_LIMIT)?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
        let section = RecurformerSection::from_config_json(&raw)
            .with_context(|| format!("in {}", cfg_path.display()))?;
        let w = weights::load_hf_dir(path)?;
        if section.is_none() {
            if let Some(n) = w.names().find(|n| n.contains(".mixer.")) {
                bail!(
                    "{} holds Mamba mixer tensors ({n}, ...) but config.json has no `recurformer` section: \
                     the plan that says which heads they replace is missing",
                    path.display()
                );
            }
        }
        let (model, summary) = Model::load_hybrid_quantized(&w, &cfg, section.as_ref(), format)
            .with_context(|| format!("loading {}", path.display()))?;
        drop(w); // unmaps the files
        let tokenizer = if path.join("tokenizer.json").exists() {
            Some(Tokenizer::from_hf_dir(path)?)
        } else {
            None
        };
        Ok((
            LoadedModel {
                model,
                tokenizer,
                format: SourceFormat::HfDir,
                path: path.to_path_buf(),
            },
            summary,
        ))
    } else if is_gguf(path)? {
        let g = GgufFile::open(path)?;
        let cfg = g.config()?;
        let w = g.weights(&cfg)?;
        let (model, summary) = Model::load_hybrid_quantized(&w, &cfg, None, format)
            .with_context(|| format!("loading {}", path.display()))?;
        drop(w);
        let tokenizer = Tokenizer::from_gguf(&g)?;
        Ok((
            LoadedModel {
                model,
                tokenizer,
                format: SourceFormat::Gguf,
                path: path.to_path_buf(),
            },
            summary,
        ))
    } else {
        bail!(
            "{} is neither a checkpoint directory (config.json) nor a GGUF file (no GGUF magic)",
            path.display()
        )
    }
}
