//! Options of a forward pass, and what the eager attention path shows an observer: shared by the
//! decoder, the mixer and the stages that watch attention (analysis, alignment).

use anyhow::Result;
use candle_core::Tensor;

/// Which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// Grouped-query matmuls without repeating K/V, queries processed in chunks so the score
    /// matrix stays small at long context. The inference path.
    #[default]
    Fast,
    /// The textbook computation (repeat K/V per query head, full score matrix, differentiable
    /// softmax); can hand the attention probabilities to an observer. The reference path.
    Eager,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attention: AttentionImpl,
    /// Use only ops that record a backward pass (candle's fused rms_norm/rope/softmax do not).
    pub differentiable: bool,
}

/// What the eager path shows an observer for each layer.
pub struct AttnObservation<'a> {
    pub layer: usize,
    /// Attention probabilities (b, nh, t, s).
    pub probs: &'a Tensor,
    /// The heads' outputs before o_proj (b, nh, t, hd).
    pub heads_out: &'a Tensor,
    /// The layer's normalised hidden state that attention read (b, t, d).
    pub input: &'a Tensor,
}

/// Receives every layer's attention probabilities and head outputs on the eager path.
pub type ProbsObserver<'a> = dyn FnMut(&AttnObservation) -> Result<()> + 'a;
