//! Checkpoints as whole models (DESIGN.md, "Real parts" and the `convert` arrow of the pipeline):
//! opening whatever `--model` points at (a Hugging Face directory, base or RecurFormer, or a GGUF
//! file) as a [`crate::model::llama::Model`] with its tokenizer, and saving a RecurFormer checkpoint
//! (config.json with its `recurformer` section, safetensors, tokenizer) atomically.

pub mod loader;
pub mod save;
