//! Measuring a model (DESIGN.md, the `eval` arrow of the pipeline): perplexity over windows of
//! text, the retrieval tasks (needle in a haystack, HashHop), and the speed and memory benchmark
//! that `bench` reports.

pub mod bench;
pub mod perplexity;
pub mod stats;
pub mod tasks;
