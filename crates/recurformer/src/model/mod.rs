//! The network and its per-sequence state (DESIGN.md, "The mixer", "Hybrid cache", "Inference
//! precision"): the Llama-family decoder, the Mamba mixer that replaces some of its KV groups, the
//! plan that says which, the hybrid cache, the CPU kernels of the decode path, and generation.
//!
//! Models are immutable; every forward takes the sequence's [`cache::HybridCache`] as `&mut`.
//! Imports point down: `llama` → `hybrid`, `mamba`, `plan` → `cache`, `options`, `kernels`,
//! and `crate::formats` below them all.

pub mod attention;
pub mod cache;
pub mod generate;
pub mod hybrid;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod mamba;
pub mod options;
pub mod plan;
pub mod quant;
pub mod window;
