//! recurformer: turn a pretrained Llama-family transformer into a RecurFormer (recency-aware
//! attention heads replaced by Mamba mixers, DESIGN.md). This crate is the whole library behind the
//! `recurformer` binary: file formats, the hybrid model and its cache, checkpoints, and the stages
//! analyze → plan → convert → train → eval, with the figures of their reports.

// The pipeline of DESIGN.md, one folder per stage, imports pointing down this list:
//
//   train ──▶ report ──▶ convert, eval ──▶ checkpoint ──▶ model ──▶ formats
//
// `formats` reads and writes files and knows nothing of the network; `model` is the network and
// its per-sequence state; `checkpoint` opens any supported checkpoint as a `model` and saves
// RecurFormer checkpoints; `convert`, `eval` and `train` are the stages; `report` draws figures.
pub mod checkpoint;
pub mod convert;
pub mod eval;
pub mod formats;
pub mod memory;
pub mod model;
pub mod report;
pub mod train;

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
