//! Files on disk, read and written without knowing the network: a checkpoint's `config.json`, GGUF
//! containers, safetensors weights, tokenizers (`tokenizer.json` or GGUF metadata), text corpora
//! and the domains they split into (training vs held-out), and atomic writes (DESIGN.md, "Real
//! parts"). The lowest layer of the library: nothing here imports from the other folders.

pub mod config;
pub mod domains;
pub mod gguf;
pub mod gguf_read;
pub mod io;
pub mod text;
pub mod tokenizer;
pub mod weights;
