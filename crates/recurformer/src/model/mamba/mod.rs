//! The Mamba mixer that replaces the recency-aware attention heads of one layer (DESIGN.md, "The
//! mixer"): a multi-head selective SSM in its Mamba-2 form, one SSM head per replaced query head.
//!
//! References: Dao & Gu (2024), "Transformers are SSMs: Generalized Models and Efficient
//! Algorithms Through Structured State Space Duality" (arXiv:2405.21060), the SSD algorithm of
//! its section 6 / listing 1 (`ssd_minimal_discrete`); and the reference module
//! `mamba_ssm/modules/mamba2.py` of state-spaces/mamba v2.2.2
//! (<https://github.com/state-spaces/mamba/blob/v2.2.2/mamba_ssm/modules/mamba2.py>).
//!
//! Glossary (code name: paper symbol, meaning):
//! - `bsz`: batch; `t`: new tokens; `d_model` (d): hidden size of the layer.
//! - `n_groups` (G): replaced KV groups; `group_size` (g): query heads per KV group;
//!   `n = G * g`: SSM heads, one per replaced query head; head i belongs to group i / g (the
//!   grouping of `llama.rs`: query head h reads KV head h / g).
//! - `head_dim` (P): SSM head size (the attention head dim); `state_size` (N): SSM state size.
//! - `conv_kernel` (K): causal depthwise conv kernel; `conv_channels` = G*P + G*N + n*N, ordered
//!   [x | B | C].
//! - `x`: x_t, (G, P) per token, shared by a group's heads (from W_v);
//!   `b` / `b_proj`: B_t, (G, N) per token (from W_k); `c` / `c_proj`: C_t, (n, N) (from W_q).
//! - `dt`: Δ_t = softplus(dt_proj u_t + dt_bias), (n) per token; `a_log`: A_log, A = -exp(A_log)
//!   (a negative scalar per head); `a` in the scan: A; `da` = Δ_t A (≤ 0), the log-decay of a step.
//! - `h`: the SSM state h_t, (n, P, N) per sequence; `d`: the skip D, (n).
//! - `z`: the output gate z_t, (n*P); `norm_weight`: scale of the gated RMSNorm.
//! - SSD (chunked scan): `l` chunk length (the paper's Q), `nc` number of chunks; `seg[t, s]` =
//!   sum_{s<r≤t} Δ_r A (the paper's `segsum`), `decay = exp(seg)` masked to s ≤ t (the paper's L).
//!
//! Recurrence per head i of group gr(i):
//!   h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        (h is P x N)
//!   y_t = h_t C_t + D x_t
//! then out = rmsnorm_P(y ⊙ silu(z)) ⊙ norm_weight per head, (n*P) per token, in head order: the
//! o_proj input slots of the replaced heads.
//!
//! Three entry points (as `mamba_ssm`'s mixers): `forward_seq` (training and prefill, writes the
//! final state), `step` (decode), `new_state` (allocation). The model is immutable; the state lives
//! in a [`RecurrentState`] passed in. Everything here uses only ops that record a backward pass, so
//! training goes through candle's autograd.

use crate::formats::weights::Weights;
use crate::model::cache::RecurrentState;
use crate::model::kernels::q8_gemv::QWeight;
use crate::model::options::ForwardOptions;
use anyhow::{bail, ensure, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use scan::{per_head, proj, softplus, ssm_step};

mod fused;
pub mod scan;
mod step;
pub use scan::{scan_chunked, scan_reference, ScanInputs};
#[cfg(test)]
pub(crate) mod tests;

/// Default chunk length of the SSD scan. Mamba-2 uses 256 on GPU; on this CPU 32, 64 and 128 time
/// within noise of each other at 1K tokens, and the intra-chunk work grows with the chunk length.
pub const DEFAULT_CHUNK: usize = 64;

/// Epsilon of the gated RMSNorm (`mamba2.py`: `RMSNormGated(..., eps=1e-5)`).
pub const NORM_EPS: f64 = 1e-5;

/// The z at which SiLU(z) = 1 (root of z * sigmoid(z) = 1; DESIGN.md says "about 1.28").
pub const SILU_ONE: f64 = 1.278_464_542_761_074;

/// Δ at initialisation from attention (Δ0): the decay is then set through A alone.
pub const ATTN_INIT_DT: f64 = 1.0;

/// Hyper-parameters of one mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MambaConfig {
    /// Replaced KV groups (G).
    pub n_groups: usize,
    /// Query heads per KV group (g).
    pub group_size: usize,
    /// SSM head size (P), the attention head dim.
    pub head_dim: usize,
    /// SSM state size (N); head_dim by default (required for initialisation from attention).
    pub state_size: usize,
    /// Causal conv kernel (K), 4.
    pub conv_kernel: usize,
    /// Hidden size of the layer (d).
    pub d_model: usize,
}

impl MambaConfig {
    /// SSM heads: one per replaced query head, n = G * g.
    pub fn n_heads(&self) -> usize {
        self.n_groups * self.group_size
    }

    /// Convolved channels, [x | B | C]: G*P + G*N + n*N.
    pub fn conv_channels(&self) -> usize {
        self.n_groups * self.head_dim
            + self.n_groups * self.state_size
            + self.n_heads() * self.state_size
    }

    /// Bytes of the recurrent state of `batch` sequences (f32): per sequence the SSM state
    /// g*G*P*N*4 plus the conv state C_ch*(K-1)*4. Equal to `n_groups` times
    /// `plan::mixer_state_bytes(g, P, N, K)`; keep the two formulas together.
    pub fn state_bytes(&self, batch: usize) -> usize {
        let ssm = self.group_size * self.n_groups * self.head_dim * self.state_size * 4;
        let conv = self.conv_channels() * self.conv_kernel.saturating_sub(1) * 4;
        batch * (ssm + conv)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.n_groups >= 1
                && self.group_size >= 1
                && self.head_dim >= 1
                && self.state_size >= 1
                && self.d_model >= 1,
            "mixer config {self:?}: every size must be at least 1"
        );
        ensure!(
            self.conv_kernel >= 2,
            "mixer config {self:?}: conv_kernel must be at least 2 (the conv state holds K-1 inputs)"
        );
        Ok(())
    }
}

/// Tensor names under the mixer's prefix (`model.layers.{l}.mixer`), in the order of
/// [`MambaMixer::params`].
pub const PARAM_NAMES: [&str; 12] = [
    "x_proj.weight",
    "B_proj.weight",
    "C_proj.weight",
    "conv.weight",
    "conv.bias",
    "dt_proj.weight",
    "dt_bias",
    "A_log",
    "D",
    "z_proj.weight",
    "z_bias",
    "norm.weight",
];

/// Which scan `forward_seq` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// SSD: intra-chunk matmuls, state carried between chunks of `chunk` tokens.
    Chunked { chunk: usize },
    /// The token-by-token reference.
    Reference,
    /// The recurrence as one CPU operation with a hand-written backward (`fused.rs`), from a zero
    /// state; with an initial state, or off the CPU, the chunked scan runs instead.
    Fused,
}

impl Default for Scan {
    /// The chunked scan. The fused op is as fast at 256 tokens and ~20 % faster over the default
    /// model's mixers at 1024 (BENCHMARKS.md, "Where a distillation step goes"), but in one tiny
    /// test model (windowed heads beside the mixers, `tests/train.rs`) the training forward through
    /// it ends 1.3e-5 from the inference forward (max |h| 3.6) where the chunked scan ends 2.6e-6,
    /// although the op itself matches the token-by-token reference exactly: not the default until
    /// that is understood. `RECURFORMER_FUSED_SCAN=1` selects it.
    fn default() -> Self {
        // Read once: this runs for every mixer of every forward.
        static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let fused = *FUSED.get_or_init(|| {
            std::env::var("RECURFORMER_FUSED_SCAN").is_ok_and(|v| !v.is_empty() && v != "0")
        });
        if fused && !crate::model::kernels::graph_kernels() {
            Scan::Fused
        } else {
            Scan::Chunked {
                chunk: DEFAULT_CHUNK,
            }
        }
    }
}

/// One mixer. Field names follow the checkpoint's tensor names ([`PARAM_NAMES`]), lower-cased.
#[derive(Debug, Clone)]
pub struct MambaMixer {
    pub cfg: MambaConfig,
    /// `x_proj.weight`, (G*P, d).
    pub x_proj: Tensor,
    /// `B_proj.weight`, (G*N, d).
    pub b_proj: Tensor,
    /// `C_proj.weight`, (n*N, d).
    pub c_proj: Tensor,
    /// `conv.weight`, (C_ch, K); tap K-1 multiplies the current token.
    pub conv_weight: Tensor,
    /// `conv.bias`, (C_ch).
    pub conv_bias: Tensor,
    /// `dt_proj.weight`, (n, d).
    pub dt_proj: Tensor,
    /// `dt_bias`, (n).
    pub dt_bias: Tensor,
    /// `A_log`, (n).
    pub a_log: Tensor,
    /// `D`, (n).
    pub d: Tensor,
    /// `z_proj.weight`, (n*P, d).
    pub z_proj: Tensor,
    /// `z_bias`, (n*P).
    pub z_bias: Tensor,
    /// `norm.weight`, (n*P).
    pub norm_weight: Tensor,
    /// The decode step's projections [x_proj; B_proj; C_proj; dt_proj; z_proj] stacked into one
    /// quantised matrix, (C_ch + n + n*P, d), for inference ([`MambaMixer::quantize`]); None in
    /// f32 (always in training). Not a parameter: never saved, rebuilt from the f32 weights.
    pub step_proj: Option<QWeight>,
}

impl MambaMixer {
    /// Expected shapes of the parameters, in [`PARAM_NAMES`] order.
    pub fn param_shapes(cfg: &MambaConfig) -> Vec<Vec<usize>> {
        let (g_, p, ns, k, d) = (
            cfg.n_groups,
            cfg.head_dim,
            cfg.state_size,
            cfg.conv_kernel,
            cfg.d_model,
        );
        let n = cfg.n_heads();
        let ch = cfg.conv_channels();
        vec![
            vec![g_ * p, d],
            vec![g_ * ns, d],
            vec![n * ns, d],
            vec![ch, k],
            vec![ch],
            vec![n, d],
            vec![n],
            vec![n],
            vec![n],
            vec![n * p, d],
            vec![n * p],
            vec![n * p],
        ]
    }

    /// The parameters in [`PARAM_NAMES`] order.
    pub fn params(&self) -> [&Tensor; 12] {
        [
            &self.x_proj,
            &self.b_proj,
            &self.c_proj,
            &self.conv_weight,
            &self.conv_bias,
            &self.dt_proj,
            &self.dt_bias,
            &self.a_log,
            &self.d,
            &self.z_proj,
            &self.z_bias,
            &self.norm_weight,
        ]
    }

    /// Builds a mixer from its parameters in [`PARAM_NAMES`] order, checking every shape.
    pub fn from_params(cfg: &MambaConfig, params: Vec<Tensor>) -> Result<Self> {
        cfg.validate()?;
        let shapes = Self::param_shapes(cfg);
        ensure!(
            params.len() == shapes.len(),
            "a mixer has {} parameters, got {}",
            shapes.len(),
            params.len()
        );
        for ((name, shape), t) in PARAM_NAMES.iter().zip(&shapes).zip(&params) {
            if t.dims() != shape.as_slice() {
                bail!(
                    "mixer parameter {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                );
            }
        }
        let mut it = params.into_iter();
        let mut next = || it.next().expect("length checked above");
        Ok(MambaMixer {
            cfg: *cfg,
            x_proj: next(),
            b_proj: next(),
            c_proj: next(),
            conv_weight: next(),
            conv_bias: next(),
            dt_proj: next(),
            dt_bias: next(),
            a_log: next(),
            d: next(),
            z_proj: next(),
            z_bias: next(),
            norm_weight: next(),
            step_proj: None,
        })
    }

    /// Loads `{prefix}.x_proj.weight`, ... (prefix like `model.layers.7.mixer`), checking shapes.
    pub fn load(w: &Weights, prefix: &str, cfg: &MambaConfig) -> Result<Self> {
        cfg.validate()?;
        let params = PARAM_NAMES
            .iter()
            .zip(Self::param_shapes(cfg))
            .map(|(name, shape)| w.get(&format!("{prefix}.{name}"), &shape))
            .collect::<Result<Vec<_>>>()?;
        Self::from_params(cfg, params)
    }

    /// The parameters under their checkpoint names, for saving.
    pub fn tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        PARAM_NAMES
            .iter()
            .zip(self.params())
            .map(|(name, t)| (format!("{prefix}.{name}"), t.clone()))
            .collect()
    }

    /// A copy whose parameters are fresh `Var`s (for training), with the vars under their names.
    pub fn trainable(&self) -> Result<(MambaMixer, Vec<(String, Var)>)> {
        let vars = self
            .params()
            .iter()
            .map(|t| Ok(Var::from_tensor(t)?))
            .collect::<Result<Vec<_>>>()?;
        let mixer = Self::from_params(
            &self.cfg,
            vars.iter().map(|v| v.as_tensor().clone()).collect(),
        )?;
        let named = PARAM_NAMES
            .iter()
            .map(|s| s.to_string())
            .zip(vars)
            .collect();
        Ok((mixer, named))
    }

    /// A copy with every parameter converted to `dtype` (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self
            .params()
            .iter()
            .map(|t| Ok(t.to_dtype(dtype)?))
            .collect::<Result<Vec<_>>>()?;
        Self::from_params(&self.cfg, params)
    }

    /// Zero state for `batch` sequences: conv (batch, C_ch, K-1), ssm (batch, n, P, N), f32.
    pub fn new_state(&self, batch: usize, device: &Device) -> Result<RecurrentState> {
        let c = &self.cfg;
        Ok(RecurrentState {
            conv: Tensor::zeros(
                (batch, c.conv_channels(), c.conv_kernel - 1),
                DType::F32,
                device,
            )?,
            ssm: Tensor::zeros(
                (batch, c.n_heads(), c.head_dim, c.state_size),
                DType::F32,
                device,
            )?,
        })
    }

    /// A = -exp(A_log), (n).
    pub fn a(&self) -> Result<Tensor> {
        Ok(self.a_log.exp()?.neg()?)
    }

    /// Δ = softplus(dt_proj u + dt_bias): u (.., d) -> (.., n).
    pub fn dt(&self, u: &Tensor) -> Result<Tensor> {
        softplus(&proj(u, &self.dt_proj)?.broadcast_add(&self.dt_bias)?)
    }

    /// The gate pre-activation z = z_proj u + z_bias: u (.., d) -> (.., n*P).
    pub fn z(&self, u: &Tensor) -> Result<Tensor> {
        Ok(proj(u, &self.z_proj)?.broadcast_add(&self.z_bias)?)
    }

    /// The conv's input channels [x | B | C] before the conv: u (.., d) -> (.., C_ch).
    pub fn xbc_proj(&self, u: &Tensor) -> Result<Tensor> {
        let r = u.rank();
        let x = proj(u, &self.x_proj)?;
        let b = proj(u, &self.b_proj)?;
        let c = proj(u, &self.c_proj)?;
        Ok(Tensor::cat(&[x, b, c], r - 1)?)
    }

    /// Splits the activated conv output (.., C_ch) into x (.., n, P), B (.., n, N) repeated over
    /// each group's heads, and C (.., n, N).
    fn split_xbc(&self, xbc: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (g_, g, p, ns, n) = (
            c.n_groups,
            c.group_size,
            c.head_dim,
            c.state_size,
            c.n_heads(),
        );
        let r = xbc.rank();
        let lead = xbc.dims()[..r - 1].to_vec();
        let shaped = |start: usize, heads: usize, k: usize| -> Result<Tensor> {
            let mut s = lead.clone();
            s.push(heads);
            s.push(k);
            Ok(xbc.narrow(r - 1, start, heads * k)?.reshape(s)?) // (.., heads, k)
        };
        let x = per_head(&shaped(0, g_, p)?, g)?; // (.., n, P)
        let b = per_head(&shaped(g_ * p, g_, ns)?, g)?; // (.., n, N)
        let cm = shaped(g_ * p + g_ * ns, n, ns)?; // (.., n, N)
        Ok((x, b, cm))
    }

    /// Output gate and gated RMSNorm per head (Mamba-2's `RMSNormGated` with
    /// `norm_before_gate=False`): rmsnorm_P(y ⊙ silu(z)) ⊙ norm_weight.
    /// y (.., n, P), z (.., n*P) -> (.., n*P).
    fn gate_norm(&self, y: &Tensor, z: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        let (n, p) = (self.cfg.n_heads(), self.cfg.head_dim);
        let r = y.rank();
        let v = (y * z.reshape(y.shape())?.silu()?)?; // (.., n, P)
        let normed = if opts.differentiable {
            let ms = v.sqr()?.mean_keepdim(r - 1)?; // (.., n, 1)
            v.broadcast_div(&(ms + NORM_EPS)?.sqrt()?)?
        } else {
            let ones = Tensor::ones(p, v.dtype(), v.device())?;
            candle_nn::ops::rms_norm(&v.contiguous()?, &ones, NORM_EPS as f32)?
        };
        let out = normed.broadcast_mul(&self.norm_weight.reshape((n, p))?)?; // (.., n, P)
        Ok(out.flatten_from(r - 2)?) // (.., n*P)
    }

    fn check_state(&self, st: &RecurrentState, bsz: usize) -> Result<()> {
        let c = &self.cfg;
        let conv = [bsz, c.conv_channels(), c.conv_kernel - 1];
        let ssm = [bsz, c.n_heads(), c.head_dim, c.state_size];
        if st.conv.dims() != conv || st.ssm.dims() != ssm {
            bail!(
                "mixer state has conv {:?} and ssm {:?}, expected {:?} and {:?}",
                st.conv.dims(),
                st.ssm.dims(),
                conv,
                ssm
            );
        }
        Ok(())
    }

    /// A whole sequence (training and prefill) with the default chunked scan: u (bsz, t, d) ->
    /// (out (bsz, t, n*P), final state). Continues from `state` when given (its conv part
    /// supplies the previous K-1 inputs).
    ///
    /// Every op records a backward pass except the gated RMSNorm's fused kernel, used when
    /// `opts.differentiable` is false; train with `differentiable: true`. When the parameters are
    /// `Var`s the returned state is part of the graph: detach it to truncate backpropagation.
    pub fn forward_seq(
        &self,
        u: &Tensor,
        state: Option<&RecurrentState>,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, RecurrentState)> {
        self.forward_seq_scan(u, state, opts, Scan::default())
    }

    /// [`MambaMixer::forward_seq`] with the scan chosen.
    pub fn forward_seq_scan(
        &self,
        u: &Tensor,
        state: Option<&RecurrentState>,
        opts: &ForwardOptions,
        scan: Scan,
    ) -> Result<(Tensor, RecurrentState)> {
        let (bsz, t, d) = u.dims3()?;
        let c = &self.cfg;
        ensure!(
            d == c.d_model,
            "mixer input has hidden size {d}, expected {}",
            c.d_model
        );
        let (k, ch) = (c.conv_kernel, c.conv_channels());
        if let Some(st) = state {
            self.check_state(st, bsz)?;
        }
        let dtype = u.dtype();

        // Causal depthwise conv as K shifted multiply-adds over [previous K-1 inputs | new inputs]
        // (DESIGN.md pitfall: grouped conv1d runs one convolution per channel). Same function as
        // PyTorch's `conv1d(padding=K-1)[..., :t]` in `mamba2.py`, tap K-1 on the current token.
        let (xbc, dt, z) = self.seq_projections(u)?; // (bsz, t, C_ch), (bsz, t, n), (bsz, t, n*P)
        let prev = match state {
            Some(st) => st.conv.to_dtype(dtype)?.transpose(1, 2)?, // (bsz, K-1, C_ch)
            None => Tensor::zeros((bsz, k - 1, ch), dtype, u.device())?,
        };
        let conv_in = Tensor::cat(&[&prev, &xbc], 1)?; // (bsz, t+K-1, C_ch)
        let new_conv = conv_in.narrow(1, t, k - 1)?.transpose(1, 2)?.contiguous()?; // (bsz, C_ch, K-1)
        let mut acc = conv_in
            .narrow(1, 0, t)?
            .broadcast_mul(&self.conv_weight.narrow(1, 0, 1)?.squeeze(1)?)?;
        for tap in 1..k {
            let wk = self.conv_weight.narrow(1, tap, 1)?.squeeze(1)?; // (C_ch)
            acc = (acc + conv_in.narrow(1, tap, t)?.broadcast_mul(&wk)?)?;
        }
        let xbc = acc.broadcast_add(&self.conv_bias)?.silu()?; // (bsz, t, C_ch)
        let (x, b, cm) = self.split_xbc(&xbc)?; // (bsz, t, n, P), (bsz, t, n, N) x2

        let a = self.a()?; // (n)
        let h0 = state.map(|s| s.ssm.to_dtype(dtype)).transpose()?;
        let inp = ScanInputs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &cm,
            d: &self.d,
            h0: h0.as_ref(),
        };
        let (y, h) = match scan {
            Scan::Chunked { chunk } => scan_chunked(&inp, chunk)?,
            Scan::Reference => scan_reference(&inp)?,
            Scan::Fused if inp.h0.is_none() && u.device().is_cpu() => fused::scan_fused(&inp)?,
            Scan::Fused => scan_chunked(&inp, DEFAULT_CHUNK)?,
        }; // (bsz, t, n, P), (bsz, n, P, N)
        let out = self.gate_norm(&y, &z, opts)?; // (bsz, t, n*P)
        let new_state = RecurrentState {
            conv: new_conv.to_dtype(DType::F32)?,
            ssm: h.to_dtype(DType::F32)?,
        };
        Ok((out, new_state))
    }

    /// One decode step: u (bsz, 1, d) or (bsz, d) -> out (bsz, 1, n*P) or (bsz, n*P); the state
    /// advances in place (its tensors are replaced).
    ///
    /// On the CPU in f32, outside training, this is one hand-written kernel (`step.rs`) after the
    /// projections (one quantised matmul when [`MambaMixer::quantize`] ran); otherwise, or with
    /// `RECURFORMER_GRAPH_KERNELS=1`, the candle ops of [`MambaMixer::step_reference`].
    pub fn step(&self, u: &Tensor, state: &mut RecurrentState) -> Result<Tensor> {
        let fast = u.device().is_cpu()
            && u.dtype() == DType::F32
            && !crate::model::kernels::graph_kernels()
            && !u.track_op()
            && self
                .params()
                .iter()
                .all(|t| t.dtype() == DType::F32 && !t.track_op());
        if fast {
            self.step_kernel(crate::model::kernels::simd::Isa::detect(), u, state)
        } else {
            self.step_reference(u, state)
        }
    }

    /// Stacks the decode step's five projections into one matrix quantised to `dtype` (inference
    /// only: the f32 weights stay for saving and training). False, and nothing changes, when the
    /// hidden size is not a multiple of the type's block.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<bool> {
        if self.cfg.d_model % dtype.block_size() != 0 {
            return Ok(false);
        }
        let w = Tensor::cat(
            &[
                &self.x_proj,
                &self.b_proj,
                &self.c_proj,
                &self.dt_proj,
                &self.z_proj,
            ],
            0,
        )?; // (C_ch + n + n*P, d)
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?;
        self.step_proj = Some(QWeight::new(q)?);
        Ok(true)
    }

    /// Weights the decode step's projections read: (count, rows of the stacked matrix).
    pub fn step_proj_weights(&self) -> usize {
        let c = &self.cfg;
        (c.conv_channels() + c.n_heads() + c.n_heads() * c.head_dim) * c.d_model
    }

    /// The conv input [x | B | C], Δ and the gate pre-activation z of a sequence:
    /// u (bsz, t, d) -> (bsz, t, C_ch), (bsz, t, n), (bsz, t, n*P). From the stacked quantised
    /// matrix when [`MambaMixer::quantize`] ran, so that prefill and decode read the same
    /// weights (cached decode = full forward); from the f32 weights otherwise.
    fn seq_projections(&self, u: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let Some(q) = &self.step_proj else {
            return Ok((self.xbc_proj(u)?, self.dt(u)?, self.z(u)?));
        };
        let (bsz, t, d) = u.dims3()?;
        let c = &self.cfg;
        let (ch, n) = (c.conv_channels(), c.n_heads());
        let all = crate::model::kernels::q8_gemv::qmatmul(q, &u.reshape((bsz * t, d))?)?
            .reshape((bsz, t, ch + n + n * c.head_dim))?; // (bsz, t, C_ch + n + n*P)
        let xbc = all.narrow(2, 0, ch)?;
        let dt = softplus(&all.narrow(2, ch, n)?.broadcast_add(&self.dt_bias)?)?;
        let z = all
            .narrow(2, ch + n, n * c.head_dim)?
            .broadcast_add(&self.z_bias)?;
        Ok((xbc, dt, z))
    }

    /// The projections of a decode step, [x | B | C | Δ pre-activation | z pre-activation]:
    /// u (bsz, d) -> (bsz, C_ch + n + n*P).
    fn step_projections(&self, u: &Tensor) -> Result<Tensor> {
        Ok(match &self.step_proj {
            Some(q) => crate::model::kernels::q8_gemv::qmatmul(q, u)?,
            None => Tensor::cat(
                &[
                    proj(u, &self.x_proj)?,
                    proj(u, &self.b_proj)?,
                    proj(u, &self.c_proj)?,
                    proj(u, &self.dt_proj)?,
                    proj(u, &self.z_proj)?,
                ],
                1,
            )?,
        })
    }

    /// [`MambaMixer::step`] as one CPU kernel (`step.rs`) on the instruction set `isa`: f32
    /// tensors on the CPU only.
    pub(crate) fn step_kernel(
        &self,
        isa: crate::model::kernels::simd::Isa,
        u: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (u2, three) = one_token(u)?;
        let (bsz, d) = u2.dims2()?;
        let c = self.cfg;
        ensure!(
            d == c.d_model,
            "mixer input has hidden size {d}, expected {}",
            c.d_model
        );
        self.check_state(state, bsz)?;
        let proj = self.step_projections(&u2)?.contiguous()?; // (bsz, C_ch + n + n*P)
        let out = self.advance(isa, &proj, state)?; // (bsz, n*P)
        Ok(if three { out.unsqueeze(1)? } else { out })
    }

    /// One decode step of n sequences, each on its own state (the rows of a batched decode
    /// step): u (n, 1, d) -> (n, 1, n_heads*P). The stacked projection runs once for all rows
    /// (one pass over its weights), the conv and scan step per sequence on its own state. Same
    /// function as [`MambaMixer::step`] on each row.
    pub fn step_batch(&self, u: &Tensor, states: &mut [&mut RecurrentState]) -> Result<Tensor> {
        let (n, t, d) = u.dims3()?;
        ensure!(
            t == 1 && states.len() == n,
            "a batched mixer step takes one token per sequence: got {t} tokens for {n} rows and \
             {} states",
            states.len()
        );
        let fast = u.device().is_cpu()
            && u.dtype() == DType::F32
            && !crate::model::kernels::graph_kernels()
            && !u.track_op()
            && self
                .params()
                .iter()
                .all(|t| t.dtype() == DType::F32 && !t.track_op());
        if !fast {
            let ys = states
                .iter_mut()
                .enumerate()
                .map(|(i, st)| self.step(&u.narrow(0, i, 1)?, st))
                .collect::<Result<Vec<_>>>()?; // n x (1, 1, n_heads*P)
            return Ok(Tensor::cat(&ys, 0)?);
        }
        ensure!(
            d == self.cfg.d_model,
            "mixer input has hidden size {d}, expected {}",
            self.cfg.d_model
        );
        for st in states.iter() {
            self.check_state(st, 1)?;
        }
        let isa = crate::model::kernels::simd::Isa::detect();
        let proj = self.step_projections(&u.reshape((n, d))?)?; // (n, C_ch + n_heads + n_heads*P)
        let ys = states
            .iter_mut()
            .enumerate()
            .map(|(i, st)| self.advance(isa, &proj.narrow(0, i, 1)?.contiguous()?, st))
            .collect::<Result<Vec<_>>>()?; // n x (1, n_heads*P)
        Ok(Tensor::cat(&ys, 0)?.unsqueeze(1)?) // (n, 1, n_heads*P)
    }

    /// The part of a decode step after the projections: `proj` (bsz, C_ch + n + n*P), already
    /// computed, advances `state` (conv, scan step, gate, norm in one kernel) -> (bsz, n*P).
    fn advance(
        &self,
        isa: crate::model::kernels::simd::Isa,
        proj: &Tensor,
        state: &mut RecurrentState,
    ) -> Result<Tensor> {
        let (bsz, _) = proj.dims2()?;
        let c = self.cfg;
        let dims = step::StepDims {
            bsz,
            n_groups: c.n_groups,
            group_size: c.group_size,
            head_dim: c.head_dim,
            state_size: c.state_size,
            conv_kernel: c.conv_kernel,
        };
        let conv = state.conv.to_dtype(DType::F32)?.contiguous()?; // (bsz, C_ch, K-1)
                                                                   // The new SSM state starts as a copy of the old one and advances in place: the old
                                                                   // tensor may be shared with a forked cache.
        let mut ssm = state
            .ssm
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut new_conv = vec![0f32; conv.elem_count()];
        let mut out = vec![0f32; bsz * c.n_heads() * c.head_dim];
        {
            let tensors = [
                ("conv.weight", &self.conv_weight),
                ("conv.bias", &self.conv_bias),
                ("dt_bias", &self.dt_bias),
                ("A_log", &self.a_log),
                ("D", &self.d),
                ("z_bias", &self.z_bias),
                ("norm.weight", &self.norm_weight),
                ("projections", &proj),
                ("conv state", &conv),
            ];
            let guards: Vec<_> = tensors
                .iter()
                .map(|(name, t)| (*name, t.storage_and_layout()))
                .collect();
            let slices =
                guards
                    .iter()
                    .map(|(name, (s, l))| match &**s {
                        candle_core::Storage::Cpu(cs) => Ok(
                            crate::model::kernels::cpu_slice::<f32>(cs, l, "mixer step", name)?,
                        ),
                        _ => bail!("mixer step: {name} is not on the CPU"),
                    })
                    .collect::<Result<Vec<&[f32]>>>()?;
            let params = step::StepParams {
                conv_weight: slices[0],
                conv_bias: slices[1],
                dt_bias: slices[2],
                a_log: slices[3],
                d: slices[4],
                z_bias: slices[5],
                norm_weight: slices[6],
            };
            let bufs = step::StepBuffers {
                proj: slices[7],
                conv: slices[8],
                ssm: &mut ssm,
                new_conv: &mut new_conv,
                out: &mut out,
            };
            if let Some(msg) = step::check_lengths(&dims, &params, &bufs) {
                bail!(msg);
            }
            step::mixer_step_on(isa, &dims, &params, bufs, NORM_EPS as f32);
        }
        let dev = proj.device();
        state.conv = Tensor::from_vec(new_conv, conv.shape(), dev)?;
        state.ssm = Tensor::from_vec(ssm, state.ssm.shape(), dev)?;
        Ok(Tensor::from_vec(out, (bsz, c.n_heads() * c.head_dim), dev)?) // (bsz, n*P)
    }

    /// One decode step as candle ops (the reference of the kernel [`MambaMixer::step`] runs):
    /// u (bsz, 1, d) or (bsz, d) -> out (bsz, 1, n*P) or (bsz, n*P); the state's tensors are
    /// replaced. Records a backward pass.
    pub fn step_reference(&self, u: &Tensor, state: &mut RecurrentState) -> Result<Tensor> {
        let (u2, three) = one_token(u)?;
        let (bsz, d) = u2.dims2()?;
        ensure!(
            d == self.cfg.d_model,
            "mixer input has hidden size {d}, expected {}",
            self.cfg.d_model
        );
        self.check_state(state, bsz)?;
        let dtype = u2.dtype();
        // The same projections as a sequence's (quantised when `quantize` ran).
        let (xbc, dt, z) = self.seq_projections(&u2.unsqueeze(1)?)?; // (bsz, 1, C_ch), (bsz, 1, n), (bsz, 1, n*P)
        let (xbc, dt, z) = (xbc.squeeze(1)?, dt.squeeze(1)?, z.squeeze(1)?);
        let conv_in = Tensor::cat(&[&state.conv.to_dtype(dtype)?, &xbc.unsqueeze(2)?], 2)?; // (bsz, C_ch, K)
        let k = self.cfg.conv_kernel;
        let xbc = conv_in
            .broadcast_mul(&self.conv_weight)?
            .sum(2)?
            .broadcast_add(&self.conv_bias)?
            .silu()?; // (bsz, C_ch)
        let (x, b, cm) = self.split_xbc(&xbc)?; // (bsz, n, P), (bsz, n, N) x2
        let (y, h) = ssm_step(
            &state.ssm.to_dtype(dtype)?,
            &x,
            &dt,
            &self.a()?,
            &b,
            &cm,
            &self.d,
        )?; // (bsz, n, P), (bsz, n, P, N)
        let opts = ForwardOptions::default();
        let out = self.gate_norm(&y, &z, &opts)?; // (bsz, n*P)
        state.conv = conv_in
            .narrow(2, 1, k - 1)?
            .contiguous()?
            .to_dtype(DType::F32)?;
        state.ssm = h.to_dtype(DType::F32)?;
        Ok(if three { out.unsqueeze(1)? } else { out })
    }

    /// Standard Mamba-2 initialisation (the ablation), following `mamba2.py`: projections
    /// U(±1/sqrt(d)) (PyTorch's `nn.Linear` default), conv weight and bias U(±1/sqrt(K))
    /// (`nn.Conv1d` default with fan-in K), Δ = exp(U(log 1e-3, log 1e-1)) floored at 1e-4 with
    /// dt_bias = softplus^{-1}(Δ), A = U(1, 16) with A_log = log A, D = 1, norm weight 1. The
    /// gate's projection is random like the rest of `in_proj`; z_bias 0 (Mamba-2 has no bias).
    pub fn init_random(cfg: &MambaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (g_, p, ns, k, d) = (
            cfg.n_groups,
            cfg.head_dim,
            cfg.state_size,
            cfg.conv_kernel,
            cfg.d_model,
        );
        let n = cfg.n_heads();
        let ch = cfg.conv_channels();
        let mut uniform = |shape: &[usize], bound: f64| -> Result<Tensor> {
            let len: usize = shape.iter().product();
            let v: Vec<f32> = (0..len)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        let lin = 1.0 / (d as f64).sqrt();
        let cb = 1.0 / (k as f64).sqrt();
        let x_proj = uniform(&[g_ * p, d], lin)?;
        let b_proj = uniform(&[g_ * ns, d], lin)?;
        let c_proj = uniform(&[n * ns, d], lin)?;
        let conv_weight = uniform(&[ch, k], cb)?;
        let conv_bias = uniform(&[ch], cb)?;
        let dt_proj = uniform(&[n, d], lin)?;
        let z_proj = uniform(&[n * p, d], lin)?;
        let (dt_min, dt_max, floor) = (1e-3f64, 1e-1f64, 1e-4f64);
        let mut dt_bias = Vec::with_capacity(n);
        let mut a_log = Vec::with_capacity(n);
        for _ in 0..n {
            let u: f64 = rng.random_range(0.0..1.0);
            let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
                .exp()
                .max(floor);
            // softplus^{-1}(dt) = dt + log(-expm1(-dt)) (mamba2.py's `inv_dt`).
            dt_bias.push((dt + (-(-dt).exp_m1()).ln()) as f32);
            let a: f64 = rng.random_range(1.0..16.0);
            a_log.push(a.ln() as f32);
        }
        let vec1 = |v: Vec<f32>| -> Result<Tensor> {
            let len = v.len();
            Ok(Tensor::from_vec(v, len, device)?)
        };
        Self::from_params(
            cfg,
            vec![
                x_proj,
                b_proj,
                c_proj,
                conv_weight,
                conv_bias,
                dt_proj,
                vec1(dt_bias)?,
                vec1(a_log)?,
                vec1(vec![1.0; n])?,
                z_proj,
                vec1(vec![0.0; n * p])?,
                vec1(vec![1.0; n * p])?,
            ],
        )
    }
}

/// A decode step's input u (bsz, 1, d) or (bsz, d) as (bsz, d), and whether it had the token axis.
fn one_token(u: &Tensor) -> Result<(Tensor, bool)> {
    if u.rank() == 3 {
        let (_, t, _) = u.dims3()?;
        ensure!(t == 1, "step takes one token, got {t}");
        Ok((u.squeeze(1)?, true))
    } else {
        Ok((u.clone(), false))
    }
}
