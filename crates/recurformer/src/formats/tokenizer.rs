//! Tokenizers: loaded from a Hugging Face `tokenizer.json`, or rebuilt from GGUF metadata
//! (`tokenizer.ggml.*`), plus the model's Jinja chat template.
//!
//! GGUF stores a byte-level BPE tokenizer as a token list, a merge list, token types and a
//! pre-tokenizer name (`tokenizer.ggml.pre`). The pre-tokenizer regexes below are the ones the
//! original Hugging Face tokenizers use for those names (llama.cpp `llama-vocab.cpp` keeps the same
//! table); the BPE itself is the `tokenizers` crate's.

use crate::formats::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether `encode(.., add_special=true)` prepends the BOS token (GGUF `add_bos_token`).
    /// For tokenizer.json files the post-processor decides instead.
    add_bos: Option<u32>,
}

// GPT-2 style splitting used by Llama 3 (`llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Qwen2: as Llama 3 but single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// `tokenizer.json` (+ the chat template and special tokens from `tokenizer_config.json`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = crate::formats::io::read_text(&path, crate::formats::io::TOKENIZER_FILE_LIMIT)?;
        // JSON syntax first, with serde_json's own error: tokenizers 0.23 panics instead of
        // failing on a decoder object that is not valid JSON (`expect("Helper")` in its
        // `decoders/mod.rs`; found by `tests/mutation.rs`).
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        // Other `expect`s remain in its deserialisers (normalizers, `Precompiled`): a panic there
        // is the file's fault and becomes an error naming it.
        let inner = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                anyhow::anyhow!(
                    "reading tokenizer {}: the tokenizers crate failed on it ({why})",
                    path.display()
                )
            })?
            .map_err(|e| anyhow::anyhow!("reading tokenizer {}: {e}", path.display()))?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos: None,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text =
                crate::formats::io::read_text(&cfg_path, crate::formats::io::JSON_FILE_LIMIT)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
            let token_str = |key: &str| -> Option<String> {
                match v.get(key) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                    None => None,
                }
            };
            tok.bos_token = token_str("bos_token");
            // A tokenizer.json without a post-processor cannot add BOS itself; honour the flag.
            if v.get("add_bos_token").and_then(|b| b.as_bool()) == Some(true)
                && tok.inner.get_post_processor().is_none()
            {
                tok.add_bos = tok
                    .bos_token
                    .as_deref()
                    .and_then(|b| tok.inner.token_to_id(b));
            }
            tok.eos_token = token_str("eos_token");
            tok.chat_template = v
                .get("chat_template")
                .and_then(|c| c.as_str())
                .map(String::from);
        }
        Ok(tok)
    }

    /// Rebuilds the tokenizer from GGUF metadata; None when the file carries no tokenizer.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>> {
        if g.meta("tokenizer.ggml.tokens").is_none() {
            return Ok(None);
        }
        let file = g.path.display().to_string();
        let model = g.meta_str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" {
            bail!(
                "{file}: tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") tokenizers can be \
                 rebuilt from GGUF. Pass a Hugging Face directory with tokenizer.json instead."
            );
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges_raw = string_array(g, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    other => bail!(
                        "{file}: tokenizer.ggml.token_type holds {:?}",
                        other.value_type()
                    ),
                })
                .collect::<Result<_>>()?,
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{file}: {} token types for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').with_context(|| {
                format!("{file}: merge {i} ({m:?}) is not two tokens separated by a space")
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("{file}: building the BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = g.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let byte_level = |use_regex: bool| {
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex))
        };
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?,
            ))
        };
        let pre_tok = match pre {
            "default" | "gpt2" | "gpt-2" => Sequence::new(vec![byte_level(true)]),
            // SmolLM: every digit on its own, then the GPT-2 split.
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)])
            }
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]),
            "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]),
            other => bail!(
                "{file}: tokenizer.ggml.pre {other:?} is not supported (supported: default, gpt2, smollm, \
                 starcoder, llama-bpe, qwen2)"
            ),
        };
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tok)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        // Control (3) and user-defined (4) tokens are matched whole before BPE, as llama.cpp does
        // when parsing special tokens.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, t)| AddedToken::from(s.clone(), *t == 3).normalized(false))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| anyhow::anyhow!("{file}: adding special tokens: {e}"))?;
        let name_of = |key: &str| -> Result<Option<String>> {
            Ok(match g.meta_usize(key)? {
                Some(id) => Some(
                    tokens
                        .get(id)
                        .with_context(|| {
                            format!(
                                "{file}: {key} = {id} is outside the vocabulary of {}",
                                tokens.len()
                            )
                        })?
                        .clone(),
                ),
                None => None,
            })
        };
        let bos_token = name_of("tokenizer.ggml.bos_token_id")?;
        let eos_token = name_of("tokenizer.ggml.eos_token_id")?;
        let add_bos = if g.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(false) {
            g.meta_usize("tokenizer.ggml.bos_token_id")?
                .map(|x| x as u32)
        } else {
            None
        };
        Ok(Some(Tokenizer {
            inner,
            chat_template: g.meta_str("tokenizer.chat_template")?.map(String::from),
            bos_token,
            eos_token,
            add_bos,
        }))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) into
    /// `dir`, so a checkpoint directory is self-contained.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let p = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising {}: {e}", p.display()))?;
        crate::formats::io::write_atomic(&p, text.as_bytes())?;
        let cfg = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos.is_some(),
        });
        crate::formats::io::write_atomic(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are matched whole.
    /// With `add_special`, the BOS token is prepended where the tokenizer asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special {
            if let Some(b) = self.add_bos {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the model's chat template (Jinja) for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().context(
            "this model has no chat template (tokenizer.chat_template / tokenizer_config.json)",
        )?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))
    }
}

fn string_array(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    match g.meta(key) {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => bail!(
                    "{}: {key}[{i}] is {:?}, expected a string",
                    g.path.display(),
                    other.value_type()
                ),
            })
            .collect(),
        Some(other) => bail!(
            "{}: {key} is {:?}, expected an array of strings",
            g.path.display(),
            other.value_type()
        ),
        None => bail!("{}: metadata {key} is missing", g.path.display()),
    }
}
