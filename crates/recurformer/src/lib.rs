//! recurformer: turn a pretrained Llama-family transformer into a RecurFormer (recency-aware
//! attention heads replaced by Mamba mixers). This crate holds the model core: configuration,
//! checkpoint loading (Hugging Face safetensors and GGUF), tokenizers, the decoder with its
//! per-sequence cache, and generation.

pub mod analyze;
pub mod bench;
pub mod cache;
pub mod config;
pub mod data;
pub mod decode_attention;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod hybrid;
pub mod io;
pub mod llama;
pub mod loader;
pub mod mamba;
pub mod memory;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod recency;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod weights;

/// Root of the repository (for tests and tools that find `data/` and `fixtures/`).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The default model, as `scripts/setup.sh` places it.
pub fn default_model_path() -> std::path::PathBuf {
    repo_root().join("data/models/smollm2-135m-instruct-q4_1.gguf")
}
