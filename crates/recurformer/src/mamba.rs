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

use crate::cache::RecurrentState;
use crate::llama::ForwardOptions;
use crate::weights::Weights;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

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

/// What the replaced attention heads of one layer supply to [`MambaMixer::init_from_attention`].
/// Rows are in head order: replaced group j owns query heads j*g..(j+1)*g of `q_rows`.
pub struct AttnSource {
    /// W_q rows of the replaced query heads, (n*P, d).
    pub q_rows: Tensor,
    /// W_k rows of the replaced KV groups, (G*P, d).
    pub k_rows: Tensor,
    /// W_v rows of the replaced KV groups, (G*P, d).
    pub v_rows: Tensor,
    /// Biases of those rows (Qwen2 has q/k/v biases), (n*P), (G*P), (G*P).
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    /// Mean attention distance (tokens) of each replaced query head, n values (recency.json).
    pub distance: Vec<f64>,
    /// RMS of each replaced head's output before o_proj, n values (recency.json).
    pub output_rms: Vec<f64>,
}

/// Which scan `forward_seq` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// SSD: intra-chunk matmuls, state carried between chunks of `chunk` tokens.
    Chunked { chunk: usize },
    /// The token-by-token reference.
    Reference,
}

impl Default for Scan {
    fn default() -> Self {
        Scan::Chunked {
            chunk: DEFAULT_CHUNK,
        }
    }
}

/// Inputs of a scan, per SSM head (x and B already repeated over a group's heads).
pub struct ScanInputs<'a> {
    /// x, (bsz, t, n, P).
    pub x: &'a Tensor,
    /// Δ (> 0), (bsz, t, n).
    pub dt: &'a Tensor,
    /// A (< 0), (n).
    pub a: &'a Tensor,
    /// B, (bsz, t, n, N).
    pub b: &'a Tensor,
    /// C, (bsz, t, n, N).
    pub c: &'a Tensor,
    /// D, (n).
    pub d: &'a Tensor,
    /// Initial state h_0, (bsz, n, P, N); zeros when absent.
    pub h0: Option<&'a Tensor>,
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
}

/// x (.., in) @ w^T with w (out, in) -> (.., out), as one 2-D GEMM.
fn proj(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?; // (rows, out)
    let mut out = dims;
    *out.last_mut().expect("non-empty dims") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Batched matmul over all leading dimensions, op(a) @ op(b) with op = transpose of the last two
/// dims when `ta` / `tb`: a (.., m, k), b (.., k, n) -> (.., m, n). The leading dims are flattened
/// into one batch dimension first: candle 0.11's CPU matmul rejects some valid strides when a
/// batch dimension has size 1 (`MatMulUnexpectedStriding`).
fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let r = a.rank();
    let lead = a.dims()[..r - 2].to_vec();
    let a3 = a.flatten_to(r - 3)?; // (batch, .., ..)
    let b3 = b.flatten_to(r - 3)?;
    let a3 = if ta { a3.t()? } else { a3 };
    let b3 = if tb { b3.t()? } else { b3 };
    let y = a3.matmul(&b3)?; // (batch, m, n)
    let mut out = lead;
    out.extend_from_slice(&y.dims()[1..]);
    Ok(y.reshape(out)?)
}

/// softplus(x) = log(1 + e^x), composed stably as relu(x) + log(1 + e^{-|x|}) (candle has no
/// softplus or log1p op; DESIGN.md, "Measured pitfalls").
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((x.relu()? + tail)?)
}

/// (.., G, P) -> (.., G*g, P): each group's vector repeated for its g query heads.
fn per_head(x: &Tensor, g: usize) -> Result<Tensor> {
    if g == 1 {
        return Ok(x.clone());
    }
    let dims = x.dims().to_vec();
    let r = dims.len();
    let mut exp = dims.clone();
    exp.insert(r - 1, g); // (.., G, g, P)
    let mut out = dims[..r - 2].to_vec();
    out.push(dims[r - 2] * g);
    out.push(dims[r - 1]);
    Ok(x.unsqueeze(r - 1)?.broadcast_as(exp)?.reshape(out)?) // (.., G*g, P)
}

/// One recurrence step for every head: h (bsz, n, P, N), x (bsz, n, P), dt (bsz, n),
/// a (n), b, c (bsz, n, N), d (n) -> (y (bsz, n, P), new h).
fn ssm_step(
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let decay = dt.broadcast_mul(a)?.exp()?.unsqueeze(2)?.unsqueeze(3)?; // (bsz, n, 1, 1)
    let dx = x.broadcast_mul(&dt.unsqueeze(2)?)?; // (bsz, n, P): Δ_t x_t
    let dbx = dx.unsqueeze(3)?.broadcast_mul(&b.unsqueeze(2)?)?; // (bsz, n, P, N)
    let h = (h.broadcast_mul(&decay)? + dbx)?;
    let y = h.broadcast_mul(&c.unsqueeze(2)?)?.sum(3)?; // (bsz, n, P): h_t C_t
    let y = (y + x.broadcast_mul(&d.unsqueeze(1)?)?)?;
    Ok((y, h))
}

fn zero_state(inp: &ScanInputs) -> Result<Tensor> {
    let (bsz, _, n, p) = inp.x.dims4()?;
    let ns = inp.b.dim(3)?;
    Ok(Tensor::zeros(
        (bsz, n, p, ns),
        inp.x.dtype(),
        inp.x.device(),
    )?)
}

/// The plain sequential scan, one token at a time: the reference the chunked scan is tested
/// against. Returns y (bsz, t, n, P) and the final state (bsz, n, P, N).
pub fn scan_reference(inp: &ScanInputs) -> Result<(Tensor, Tensor)> {
    let (_, t, _, _) = inp.x.dims4()?;
    let mut h = match inp.h0 {
        Some(h) => h.clone(),
        None => zero_state(inp)?,
    };
    let mut ys = Vec::with_capacity(t);
    for i in 0..t {
        let at = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(1, i, 1)?.squeeze(1)?) };
        let (y, nh) = ssm_step(
            &h,
            &at(inp.x)?,
            &at(inp.dt)?,
            inp.a,
            &at(inp.b)?,
            &at(inp.c)?,
            inp.d,
        )?;
        ys.push(y);
        h = nh;
    }
    Ok((Tensor::stack(&ys, 1)?, h)) // (bsz, t, n, P)
}

/// 0/1 matrices of one chunk of length l (in `dtype`):
/// - `lower` (l, l): 1 where j ≤ i (row i, column j). `lower @ X` sums X's rows 0..=i; as the mask
///   of the decay matrix it keeps s ≤ t;
/// - `strict` (l, l): 1 where i > j. `a @ strict` gives sum_{r>s} a_r;
/// - `cum` = lower^T: `a @ cum` gives sum_{r≤t} a_r.
///
/// Every log-decay built from these is a sum of exactly the terms it needs, never a difference of
/// two cumulative sums: `mamba_ssm`'s stable `segsum` does the same, because
/// exp(cumsum_t - cumsum_s) loses precision when the cumulative sums are large.
struct ChunkMatrices {
    lower: Tensor,
    strict: Tensor,
    cum: Tensor,
}

impl ChunkMatrices {
    fn new(l: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let mut lower = vec![0f32; l * l];
        let mut strict = vec![0f32; l * l];
        for i in 0..l {
            for j in 0..l {
                lower[i * l + j] = if j <= i { 1.0 } else { 0.0 };
                strict[i * l + j] = if i > j { 1.0 } else { 0.0 };
            }
        }
        let mk = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (l, l), dev)?.to_dtype(dtype)?)
        };
        let lower = mk(&lower)?;
        Ok(ChunkMatrices {
            cum: lower.t()?.contiguous()?,
            strict: mk(&strict)?,
            lower,
        })
    }
}

/// The chunked scan (SSD, Dao & Gu 2024, section 6 and listing 1 `ssd_minimal_discrete`): the
/// sequence is cut into `nc` chunks of `l` tokens (the last one padded with Δ = 0, which leaves the
/// state unchanged). Within a chunk the outputs are one masked matrix product, between chunks the
/// state is carried:
///
/// 1. intra-chunk (the diagonal blocks): y_diag = (C B^T ∘ decay ∘ Δ_s) x, decay[t, s] =
///    exp(sum_{s<r≤t} Δ_r A) for s ≤ t;
/// 2. each chunk's own contribution to the state: S_c = sum_s exp(sum_{r>s} Δ_r A) Δ_s x_s B_s^T;
/// 3. state passing: h_in[c] = state entering chunk c; h_in[c+1] = exp(sum_chunk Δ A) h_in[c] + S_c.
///    Departure: listing 1 does this step with an (nc+1)^2 decay matrix built from cumulative
///    sums; here it is a loop over the nc chunks (linear in length and exact, like the
///    `_state_passing_fwd` kernel of `mamba_ssm/ops/triton/ssd_state_passing.py`);
/// 4. state to outputs (the off-diagonal blocks): y_off[t] = exp(sum_{r≤t} Δ_r A) C_t h_in[c];
///
/// y = y_diag + y_off + D x. Returns y (bsz, t, n, P) and the final state (bsz, n, P, N).
pub fn scan_chunked(inp: &ScanInputs, chunk: usize) -> Result<(Tensor, Tensor)> {
    let (bsz, t, n, p) = inp.x.dims4()?;
    ensure!(chunk >= 1, "chunk length must be at least 1");
    let h0 = match inp.h0 {
        Some(h) => h.clone(),
        None => zero_state(inp)?,
    };
    if t == 0 {
        let y = Tensor::zeros((bsz, 0, n, p), inp.x.dtype(), inp.x.device())?;
        return Ok((y, h0));
    }
    let (dtype, dev) = (inp.x.dtype(), inp.x.device());
    let l = chunk.min(t);
    let nc = t.div_ceil(l);
    let pad = nc * l - t;
    let padded = |x: &Tensor| -> Result<Tensor> {
        Ok(if pad > 0 {
            x.pad_with_zeros(1, 0, pad)?
        } else {
            x.clone()
        })
    };
    // (bsz, t, n, k) -> (bsz, n, nc, l, k)
    let chunks4 = |x: &Tensor| -> Result<Tensor> {
        let k = x.dim(3)?;
        Ok(padded(x)?
            .reshape((bsz, nc, l, n, k))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?) // (bsz, n, nc, l, k)
    };
    let x = chunks4(inp.x)?; // (bsz, n, nc, l, P)
    let b = chunks4(inp.b)?; // (bsz, n, nc, l, N)
    let c = chunks4(inp.c)?; // (bsz, n, nc, l, N)
    let dt = padded(inp.dt)?
        .reshape((bsz, nc, l, n))?
        .permute((0, 3, 1, 2))?
        .contiguous()?; // (bsz, n, nc, l)
    let da = dt.broadcast_mul(&inp.a.reshape((1, n, 1, 1))?)?; // (bsz, n, nc, l): Δ_t A ≤ 0
    let m = ChunkMatrices::new(l, dtype, dev)?;
    let bnc = bsz * n * nc;
    let da2 = da.reshape((bnc, l))?; // (bsz*n*nc, l)

    // seg[t, s] = sum_{s<r≤t} Δ_r A, as the stable `segsum` of `mamba_ssm/modules/ssd_minimal.py`:
    // X[r, s] = Δ_r A where r > s, then a cumulative sum over r (one matmul with `lower`).
    let xm = da2.unsqueeze(2)?.broadcast_mul(&m.strict)?; // (bnc, l[r], l[s])
    let xm = xm.transpose(0, 1)?.reshape((l, bnc * l))?; // (l[r], bnc*l[s])
    let seg = m
        .lower
        .matmul(&xm)? // (l[t], bnc*l[s])
        .reshape((l, bnc, l))?
        .transpose(0, 1)? // (bnc, l[t], l[s])
        .reshape((bsz, n, nc, l, l))?; // (bsz, n, nc, l[t], l[s]); 0 where s ≥ t
    let decay = seg.exp()?.broadcast_mul(&m.lower)?; // 0 above the diagonal
    let cum = da2.matmul(&m.cum)?.reshape((bsz, n, nc, l))?; // sum_{r≤t} Δ_r A
    let rev = da2.matmul(&m.strict)?.reshape((bsz, n, nc, l))?; // sum_{r>s} Δ_r A
    let total = cum.narrow(3, l - 1, 1)?; // (bsz, n, nc, 1): the chunk's whole log-decay

    // 1. Intra-chunk outputs.
    let cb = bmm(&c, &b, false, true)?; // (bsz, n, nc, l[t], l[s]): C_t · B_s
    let mix = (cb * decay)?.broadcast_mul(&dt.unsqueeze(3)?)?; // Δ_s on the columns
    let y_diag = bmm(&mix, &x, false, false)?; // (bsz, n, nc, l, P)

    // 2. Each chunk's state from a zero initial state.
    let w = (rev.exp()? * &dt)?.unsqueeze(4)?; // (bsz, n, nc, l, 1)
    let states = bmm(&x, &b.broadcast_mul(&w)?, true, false)?; // (bsz, n, nc, P, N)

    // 3. Carry the state across chunks.
    let chunk_decay = total.exp()?; // (bsz, n, nc, 1)
    let mut h = h0;
    let mut h_in = Vec::with_capacity(nc);
    for ci in 0..nc {
        h_in.push(h.clone());
        let dc = chunk_decay.narrow(2, ci, 1)?; // (bsz, n, 1, 1)
        let sc = states.narrow(2, ci, 1)?.squeeze(2)?; // (bsz, n, P, N)
        h = (h.broadcast_mul(&dc)? + sc)?;
    }
    let h_in = Tensor::stack(&h_in, 2)?; // (bsz, n, nc, P, N)

    // 4. Outputs from the state entering each chunk.
    let y_off = bmm(&c, &h_in, false, true)?; // (bsz, n, nc, l, P): C_t h_in
    let y_off = y_off.broadcast_mul(&cum.exp()?.unsqueeze(4)?)?;

    let skip = x.broadcast_mul(&inp.d.reshape((1, n, 1, 1, 1))?)?;
    let y = ((y_diag + y_off)? + skip)?; // (bsz, n, nc, l, P)
    let y = y
        .permute((0, 2, 3, 1, 4))? // (bsz, nc, l, n, P)
        .reshape((bsz, nc * l, n, p))?
        .narrow(1, 0, t)?; // (bsz, t, n, P)
    Ok((y, h))
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
        let xbc = self.xbc_proj(u)?; // (bsz, t, C_ch)
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

        let dt = self.dt(u)?; // (bsz, t, n)
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
        }; // (bsz, t, n, P), (bsz, n, P, N)
        let out = self.gate_norm(&y, &self.z(u)?, opts)?; // (bsz, t, n*P)
        let new_state = RecurrentState {
            conv: new_conv.to_dtype(DType::F32)?,
            ssm: h.to_dtype(DType::F32)?,
        };
        Ok((out, new_state))
    }

    /// One decode step: u (bsz, 1, d) or (bsz, d) -> out (bsz, 1, n*P) or (bsz, n*P); the state
    /// advances in place (its tensors are replaced).
    pub fn step(&self, u: &Tensor, state: &mut RecurrentState) -> Result<Tensor> {
        let three = u.rank() == 3;
        let u2 = if three {
            let (_, t, _) = u.dims3()?;
            ensure!(t == 1, "step takes one token, got {t}");
            u.squeeze(1)?
        } else {
            u.clone()
        };
        let (bsz, d) = u2.dims2()?;
        ensure!(
            d == self.cfg.d_model,
            "mixer input has hidden size {d}, expected {}",
            self.cfg.d_model
        );
        self.check_state(state, bsz)?;
        let dtype = u2.dtype();
        let xbc = self.xbc_proj(&u2)?; // (bsz, C_ch)
        let conv_in = Tensor::cat(&[&state.conv.to_dtype(dtype)?, &xbc.unsqueeze(2)?], 2)?; // (bsz, C_ch, K)
        let k = self.cfg.conv_kernel;
        let xbc = conv_in
            .broadcast_mul(&self.conv_weight)?
            .sum(2)?
            .broadcast_add(&self.conv_bias)?
            .silu()?; // (bsz, C_ch)
        let (x, b, cm) = self.split_xbc(&xbc)?; // (bsz, n, P), (bsz, n, N) x2
        let dt = self.dt(&u2)?; // (bsz, n)
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
        let out = self.gate_norm(&y, &self.z(&u2)?, &opts)?; // (bsz, n*P)
        state.conv = conv_in
            .narrow(2, 1, k - 1)?
            .contiguous()?
            .to_dtype(DType::F32)?;
        state.ssm = h.to_dtype(DType::F32)?;
        Ok(if three { out.unsqueeze(1)? } else { out })
    }

    /// Initialisation from the replaced attention heads (DESIGN.md, "Initialisation from the
    /// replaced heads"). Read as linear attention a head computes sum_s (q_t·k_s) v_s; the SSM
    /// computes sum_s (C_t·B_s) decay(t,s) Δ_s x_s, so C <- W_q, B <- W_k, x <- W_v.
    pub fn init_from_attention(src: &AttnSource, cfg: &MambaConfig) -> Result<Self> {
        cfg.validate()?;
        let (g_, p, ns, k, d) = (
            cfg.n_groups,
            cfg.head_dim,
            cfg.state_size,
            cfg.conv_kernel,
            cfg.d_model,
        );
        let n = cfg.n_heads();
        ensure!(
            ns == p,
            "initialisation from attention needs state_size = head_dim (B comes from W_k rows), \
             got state_size {ns}, head_dim {p}"
        );
        let check = |what: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
            if t.dims() != shape {
                bail!(
                    "attention source {what} has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                );
            }
            Ok(())
        };
        check("q_rows", &src.q_rows, &[n * p, d])?;
        check("k_rows", &src.k_rows, &[g_ * p, d])?;
        check("v_rows", &src.v_rows, &[g_ * p, d])?;
        ensure!(
            src.distance.len() == n && src.output_rms.len() == n,
            "attention source has {} distances and {} output RMS values for {n} replaced heads",
            src.distance.len(),
            src.output_rms.len()
        );
        for (i, (&dist, &rms)) in src.distance.iter().zip(&src.output_rms).enumerate() {
            ensure!(
                dist.is_finite() && dist >= 0.0,
                "replaced head {i} has mean attention distance {dist}"
            );
            ensure!(
                rms.is_finite() && rms > 0.0,
                "replaced head {i} has output RMS {rms}; expected a positive number"
            );
        }
        let dev = src.q_rows.device();
        let f32v =
            |v: Vec<f32>, len: usize| -> Result<Tensor> { Ok(Tensor::from_vec(v, len, dev)?) };
        let ch = cfg.conv_channels();

        // x, B, C from W_v, W_k, W_q. C is scaled by 1/sqrt(P) to mirror attention's q·k/sqrt(P);
        // the gated RMSNorm below makes the output scale independent of it, but it keeps C·B on
        // the scale of the attention logits. Departures from the attention head: no RoPE (the
        // decay carries position), and the conv's SiLU sees the projections (Mamba-2 applies SiLU
        // to x, B, C; silu(v) ≈ v only for positive v) — training recovers the difference.
        let x_proj = src.v_rows.to_dtype(DType::F32)?;
        let b_proj = src.k_rows.to_dtype(DType::F32)?;
        let c_proj = (src.q_rows.to_dtype(DType::F32)? / (p as f64).sqrt())?;

        // Conv "identity": the last tap (current token) 1, the others 0, so the conv passes the
        // projections through. q/k/v biases (Qwen2) are folded into the conv bias, which an
        // identity conv adds to the same channels (C's bias scaled like C).
        let mut w = vec![0f32; ch * k];
        for c in 0..ch {
            w[c * k + k - 1] = 1.0;
        }
        let conv_weight = Tensor::from_vec(w, (ch, k), dev)?;
        let bias_or_zero = |bias: &Option<Tensor>, len: usize, what: &str| -> Result<Tensor> {
            match bias {
                Some(b) => {
                    check(what, b, &[len])?;
                    Ok(b.to_dtype(DType::F32)?)
                }
                None => Ok(Tensor::zeros(len, DType::F32, dev)?),
            }
        };
        let conv_bias = Tensor::cat(
            &[
                bias_or_zero(&src.v_bias, g_ * p, "v_bias")?,
                bias_or_zero(&src.k_bias, g_ * ns, "k_bias")?,
                (bias_or_zero(&src.q_bias, n * ns, "q_bias")? / (p as f64).sqrt())?,
            ],
            0,
        )?;

        // Δ: dt_proj at zero and dt_bias = softplus^{-1}(Δ0), so Δ = Δ0 = 1 for every token at
        // the start; training makes it input-dependent. (mamba2.py samples Δ log-uniformly in
        // [1e-3, 1e-1] instead; here the decay is set through A from the measured distance.)
        let dt0 = ATTN_INIT_DT;
        let dt_bias_v = (dt0.exp() - 1.0).ln() as f32; // softplus^{-1}(Δ0) = log(e^Δ0 - 1)
        let dt_proj = Tensor::zeros((n, d), DType::F32, dev)?;
        let dt_bias = f32v(vec![dt_bias_v; n], n)?;

        // A: exp(Δ0 A) = exp(-1 / max(distance, 1)), i.e. a time constant of about the head's mean
        // attention distance in tokens: A_log = log(1 / (Δ0 max(distance, 1))).
        let a_log = f32v(
            src.distance
                .iter()
                .map(|&dist| (1.0 / (dt0 * dist.max(1.0))).ln() as f32)
                .collect(),
            n,
        )?;
        // D = 0: attention has no skip from the current value beyond its own attention weight.
        let dd = f32v(vec![0.0; n], n)?;
        // Gate: z_proj zero and z_bias at SiLU's 1, so the gate passes y unchanged at the start.
        let z_proj = Tensor::zeros((n * p, d), DType::F32, dev)?;
        let z_bias = f32v(vec![SILU_ONE as f32; n * p], n * p)?;
        // Gated RMSNorm scale: the replaced head's output RMS, so o_proj receives inputs on the
        // scale it was trained for (softmax averages values, the recurrence sums them).
        let norm_weight = f32v(
            src.output_rms
                .iter()
                .flat_map(|&r| std::iter::repeat_n(r as f32, p))
                .collect(),
            n * p,
        )?;
        Self::from_params(
            cfg,
            vec![
                x_proj,
                b_proj,
                c_proj,
                conv_weight,
                conv_bias,
                dt_proj,
                dt_bias,
                a_log,
                dd,
                z_proj,
                z_bias,
                norm_weight,
            ],
        )
        .context("initialising a mixer from attention")
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
        let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
        Ok((
            d.max_all()?.to_scalar::<f64>()?,
            d.mean_all()?.to_scalar::<f64>()?,
        ))
    }

    fn max_abs_val(a: &Tensor) -> Result<f64> {
        Ok(a.to_dtype(DType::F64)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?)
    }

    fn uni(shape: &[usize], lo: f64, hi: f64, rng: &mut rand::rngs::StdRng) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len).map(|_| rng.random_range(lo..hi) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Random scan inputs: (x, dt, a, b, c, d, h0).
    struct RawInputs {
        x: Tensor,
        dt: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        d: Tensor,
        h0: Tensor,
    }

    fn raw_inputs(
        bsz: usize,
        t: usize,
        n: usize,
        p: usize,
        ns: usize,
        seed: u64,
    ) -> Result<RawInputs> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Ok(RawInputs {
            x: uni(&[bsz, t, n, p], -1.0, 1.0, &mut rng)?,
            dt: uni(&[bsz, t, n], 0.01, 1.0, &mut rng)?,
            a: uni(&[n], -2.0, -0.05, &mut rng)?,
            b: uni(&[bsz, t, n, ns], -0.5, 0.5, &mut rng)?,
            c: uni(&[bsz, t, n, ns], -0.5, 0.5, &mut rng)?,
            d: uni(&[n], -1.0, 1.0, &mut rng)?,
            h0: uni(&[bsz, n, p, ns], -1.0, 1.0, &mut rng)?,
        })
    }

    fn tiny_cfg() -> MambaConfig {
        MambaConfig {
            n_groups: 2,
            group_size: 2,
            head_dim: 4,
            state_size: 3,
            conv_kernel: 4,
            d_model: 10,
        }
    }

    /// A random mixer whose parameters are all generic (D, z_bias, norm weight not constant).
    fn tiny_mixer(seed: u64) -> Result<MambaMixer> {
        let cfg = tiny_cfg();
        let m = MambaMixer::init_random(&cfg, seed, &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        let n = cfg.n_heads();
        let np = n * cfg.head_dim;
        let mut params: Vec<Tensor> = m.params().iter().map(|t| (*t).clone()).collect();
        params[6] = uni(&[n], -1.0, 1.0, &mut rng)?; // dt_bias: Δ around 0.3..1.3
        params[8] = uni(&[n], -1.0, 1.0, &mut rng)?; // D
        params[10] = uni(&[np], -0.5, 0.5, &mut rng)?; // z_bias
        params[11] = uni(&[np], 0.5, 1.5, &mut rng)?; // norm weight
        MambaMixer::from_params(&cfg, params)
    }

    #[test]
    fn chunked_scan_matches_reference() -> Result<()> {
        let (bsz, n, p, ns) = (2, 3, 4, 5);
        let mut worst = 0f64;
        for &t in &[37usize, 16, 1] {
            let r = raw_inputs(bsz, t, n, p, ns, 7 + t as u64)?;
            for with_state in [false, true] {
                let inp = ScanInputs {
                    x: &r.x,
                    dt: &r.dt,
                    a: &r.a,
                    b: &r.b,
                    c: &r.c,
                    d: &r.d,
                    h0: with_state.then_some(&r.h0),
                };
                let (y_ref, h_ref) = scan_reference(&inp)?;
                for &chunk in &[1usize, 3, 8, 64] {
                    let (y, h) = scan_chunked(&inp, chunk)?;
                    assert_eq!(y.dims(), y_ref.dims());
                    let (ym, ya) = max_abs(&y, &y_ref)?;
                    let (hm, ha) = max_abs(&h, &h_ref)?;
                    println!(
                        "t={t:2} chunk={chunk:2} state={with_state:5}: y max {ym:.2e} mean {ya:.2e} \
                         (|y| max {:.2}), h max {hm:.2e} mean {ha:.2e}",
                        max_abs_val(&y_ref)?
                    );
                    worst = worst.max(ym).max(hm);
                    assert!(
                        ym <= 1e-5 && hm <= 1e-5,
                        "t={t} chunk={chunk}: {ym:e} {hm:e}"
                    );
                }
            }
        }
        println!("worst max abs error {worst:.2e}");
        Ok(())
    }

    #[test]
    fn chunked_scan_gradients_match_reference() -> Result<()> {
        let (bsz, t, n, p, ns) = (2, 23, 3, 4, 5);
        let r = raw_inputs(bsz, t, n, p, ns, 11)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let wy = uni(&[bsz, t, n, p], -1.0, 1.0, &mut rng)?;
        let wh = uni(&[bsz, n, p, ns], -1.0, 1.0, &mut rng)?;
        let vars: Vec<Var> = [&r.x, &r.dt, &r.a, &r.b, &r.c, &r.d, &r.h0]
            .iter()
            .map(|t| Var::from_tensor(t))
            .collect::<candle_core::Result<_>>()?;
        let run = |chunk: Option<usize>| -> Result<GradStore> {
            let inp = ScanInputs {
                x: vars[0].as_tensor(),
                dt: vars[1].as_tensor(),
                a: vars[2].as_tensor(),
                b: vars[3].as_tensor(),
                c: vars[4].as_tensor(),
                d: vars[5].as_tensor(),
                h0: Some(vars[6].as_tensor()),
            };
            let (y, h) = match chunk {
                Some(c) => scan_chunked(&inp, c)?,
                None => scan_reference(&inp)?,
            };
            let loss = ((y * &wy)?.sum_all()? + (h * &wh)?.sum_all()?)?;
            Ok(loss.backward()?)
        };
        let g_ref = run(None)?;
        let names = ["x", "dt", "A", "B", "C", "D", "h0"];
        for chunk in [4usize, 8, 64] {
            let g = run(Some(chunk))?;
            for (name, v) in names.iter().zip(&vars) {
                let a = g.get(v).context("no gradient")?;
                let b = g_ref.get(v).context("no reference gradient")?;
                let (m, mean) = max_abs(a, b)?;
                let rel = m / max_abs_val(b)?;
                println!(
                    "chunk {chunk:2} d/d{name:2}: max abs {m:.2e} mean {mean:.2e} rel {rel:.2e}"
                );
                assert!(
                    rel <= 1e-4,
                    "chunk {chunk} d/d{name}: relative error {rel:e}"
                );
            }
        }
        Ok(())
    }

    fn sum_sq(x: &Tensor) -> Result<Tensor> {
        Ok(x.sqr()?.sum_all()?)
    }

    #[test]
    fn forward_seq_gradients_match_reference_scan_and_finite_differences() -> Result<()> {
        let mixer = tiny_mixer(3)?;
        let opts = ForwardOptions {
            differentiable: true,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let u = uni(&[2, 13, 10], -1.0, 1.0, &mut rng)?;
        // Autograd through both scans.
        let (tm, vars) = mixer.trainable()?;
        let grads = |scan: Scan| -> Result<GradStore> {
            let (y, _) = tm.forward_seq_scan(&u, None, &opts, scan)?;
            Ok(sum_sq(&y)?.backward()?)
        };
        let g_ref = grads(Scan::Reference)?;
        let g_chk = grads(Scan::Chunked { chunk: 4 })?;
        for (name, v) in &vars {
            let (a, b) = (g_chk.get(v).context("grad")?, g_ref.get(v).context("grad")?);
            let (m, _) = max_abs(a, b)?;
            let rel = m / max_abs_val(b)?.max(1e-12);
            println!("forward_seq d/d{name}: chunked vs reference rel {rel:.2e}");
            assert!(rel <= 1e-4, "{name}: {rel:e}");
        }

        // Finite differences in f64 on selected entries.
        let m64 = mixer.to_dtype(DType::F64)?;
        let u64_ = u.to_dtype(DType::F64)?;
        let (tm64, vars64) = m64.trainable()?;
        let fd_scan = Scan::Chunked { chunk: 4 };
        let (y, _) = tm64.forward_seq_scan(&u64_, None, &opts, fd_scan)?;
        let g = sum_sq(&y)?.backward()?;
        let loss_of = |params: Vec<Tensor>| -> Result<f64> {
            let m = MambaMixer::from_params(&m64.cfg, params)?;
            let (y, _) = m.forward_seq_scan(&u64_, None, &opts, fd_scan)?;
            Ok(sum_sq(&y)?.to_scalar::<f64>()?)
        };
        // (parameter index, flat element index)
        let probes = [
            (7usize, 0usize),
            (7, 3),
            (6, 1),
            (0, 0),
            (0, 17),
            (3, 2 * 4 + 3),
            (3, 5 * 4 + 1),
        ];
        for (pi, ei) in probes {
            let base: Vec<Tensor> = m64.params().iter().map(|t| (*t).clone()).collect();
            let shape = base[pi].dims().to_vec();
            let flat = base[pi].flatten_all()?.to_vec1::<f64>()?;
            let eps = 1e-5;
            let perturbed = |delta: f64| -> Result<f64> {
                let mut f = flat.clone();
                f[ei] += delta;
                let mut ps = base.clone();
                ps[pi] = Tensor::from_vec(f, shape.as_slice(), &Device::Cpu)?;
                loss_of(ps)
            };
            let fd = (perturbed(eps)? - perturbed(-eps)?) / (2.0 * eps);
            let ad = g
                .get(&vars64[pi].1)
                .context("grad")?
                .flatten_all()?
                .to_vec1::<f64>()?[ei];
            let rel = (fd - ad).abs() / fd.abs().max(ad.abs()).max(1e-8);
            println!(
                "FD {}[{ei}]: finite diff {fd:.8e} autograd {ad:.8e} rel {rel:.2e}",
                PARAM_NAMES[pi]
            );
            assert!(
                rel <= 1e-5,
                "{}[{ei}]: fd {fd} vs autograd {ad}",
                PARAM_NAMES[pi]
            );
        }
        Ok(())
    }

    #[test]
    fn forward_seq_state_matches_steps_and_pieces() -> Result<()> {
        let mixer = tiny_mixer(9)?;
        let opts = ForwardOptions::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let (bsz, t) = (2, 19);
        let u = uni(&[bsz, t, 10], -1.0, 1.0, &mut rng)?;
        let (y, st) = mixer.forward_seq(&u, None, &opts)?;
        let mut s = mixer.new_state(bsz, &Device::Cpu)?;
        let mut ys = vec![];
        for i in 0..t {
            let ui = u.narrow(1, i, 1)?; // (bsz, 1, d)
            let yi = if i % 2 == 0 {
                mixer.step(&ui, &mut s)?
            } else {
                mixer.step(&ui.squeeze(1)?, &mut s)?.unsqueeze(1)?
            };
            ys.push(yi);
        }
        let y_steps = Tensor::cat(&ys, 1)?;
        let (ye, _) = max_abs(&y, &y_steps)?;
        let (ce, _) = max_abs(&st.conv, &s.conv)?;
        let (he, _) = max_abs(&st.ssm, &s.ssm)?;
        println!("forward_seq vs step: y {ye:.2e} conv {ce:.2e} ssm {he:.2e}");
        assert!(ye <= 1e-5 && ce <= 1e-5 && he <= 1e-5);

        // Two pieces with the state passed equal one piece, for several split points.
        for split in [1usize, 3, 8, 12] {
            let (y1, s1) = mixer.forward_seq(&u.narrow(1, 0, split)?, None, &opts)?;
            let (y2, s2) = mixer.forward_seq(&u.narrow(1, split, t - split)?, Some(&s1), &opts)?;
            let y12 = Tensor::cat(&[y1, y2], 1)?;
            let (ye, _) = max_abs(&y, &y12)?;
            let (ce, _) = max_abs(&st.conv, &s2.conv)?;
            let (he, _) = max_abs(&st.ssm, &s2.ssm)?;
            println!("split at {split}: y {ye:.2e} conv {ce:.2e} ssm {he:.2e}");
            assert!(ye <= 1e-5 && ce <= 1e-5 && he <= 1e-5);
        }
        // The differentiable and fast norm paths agree.
        let (yd, _) = mixer.forward_seq(
            &u,
            None,
            &ForwardOptions {
                differentiable: true,
                ..Default::default()
            },
        )?;
        let (e, _) = max_abs(&y, &yd)?;
        assert!(e <= 1e-5, "{e}");
        Ok(())
    }

    #[test]
    fn every_parameter_gets_a_gradient() -> Result<()> {
        let opts = ForwardOptions {
            differentiable: true,
            ..Default::default()
        };
        let cfg = tiny_cfg();
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let u = uni(&[2, 11, 10], -1.0, 1.0, &mut rng)?;
        let r = uni(&[2, 11, cfg.n_heads() * cfg.head_dim], -1.0, 1.0, &mut rng)?;
        let n = cfg.n_heads();
        let src = AttnSource {
            q_rows: uni(&[n * 4, 10], -0.5, 0.5, &mut rng)?,
            k_rows: uni(&[2 * 4, 10], -0.5, 0.5, &mut rng)?,
            v_rows: uni(&[2 * 4, 10], -0.5, 0.5, &mut rng)?,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            distance: vec![3.0, 10.0, 0.5, 40.0],
            output_rms: vec![0.3, 1.0, 2.0, 0.7],
        };
        let attn_cfg = MambaConfig {
            state_size: 4,
            ..cfg
        };
        for (what, mixer) in [
            ("random", MambaMixer::init_random(&cfg, 1, &Device::Cpu)?),
            (
                "attention",
                MambaMixer::init_from_attention(&src, &attn_cfg)?,
            ),
        ] {
            let (tm, vars) = mixer.trainable()?;
            let (y, _) = tm.forward_seq(&u, None, &opts)?;
            let g = (y * &r)?.sum_all()?.backward()?;
            for (name, v) in &vars {
                let gv = g
                    .get(v)
                    .with_context(|| format!("{what}: {name} got no gradient"))?;
                let m = max_abs_val(gv)?;
                println!("{what} init: |d/d{name}| max {m:.2e}");
                assert!(m > 0.0 && m.is_finite(), "{what}: {name} gradient {m}");
            }
        }
        Ok(())
    }

    #[test]
    fn attention_init_sets_step_gate_and_decay() -> Result<()> {
        let cfg = MambaConfig {
            n_groups: 1,
            group_size: 2,
            head_dim: 8,
            state_size: 8,
            conv_kernel: 4,
            d_model: 12,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let src = AttnSource {
            q_rows: uni(&[16, 12], -1.0, 1.0, &mut rng)?,
            k_rows: uni(&[8, 12], -1.0, 1.0, &mut rng)?,
            v_rows: uni(&[8, 12], -1.0, 1.0, &mut rng)?,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            distance: vec![5.0, 0.3],
            output_rms: vec![0.25, 1.5],
        };
        let m = MambaMixer::init_from_attention(&src, &cfg)?;
        let u = uni(&[1, 9, 12], -2.0, 2.0, &mut rng)?;
        let dt = m.dt(&u)?; // (1, 9, 2)
        let (e, _) = max_abs(&dt, &dt.ones_like()?)?;
        assert!(e <= 1e-6, "Δ differs from 1 by {e}");
        let gate = m.z(&u)?.silu()?;
        let (e, _) = max_abs(&gate, &gate.ones_like()?)?;
        println!("attention init: |silu(z) - 1| max {e:.2e}");
        assert!(e <= 1e-2);
        let decay = dt
            .broadcast_mul(&m.a()?)?
            .exp()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, v) in decay.iter().enumerate() {
            let expect = (-1.0 / src.distance[i % 2].max(1.0)).exp();
            assert!(
                (*v as f64 - expect).abs() <= 1e-6,
                "head {}: {v} vs {expect}",
                i % 2
            );
        }
        // The identity conv passes the projections through: x = silu(W_v u) at every token.
        let (_, st) = m.forward_seq(&u, None, &ForwardOptions::default())?;
        let last = u.narrow(1, 8, 1)?.squeeze(1)?; // (1, 12)
                                                   // The conv state holds the raw (pre-conv) inputs of the last K-1 tokens, x first.
        let v_last = proj(&last, &src.v_rows)?; // (1, 8)
        let conv_x = st.conv.narrow(1, 0, 8)?.narrow(2, 2, 1)?.squeeze(2)?; // (1, 8)
        let (e, _) = max_abs(&conv_x, &v_last)?;
        assert!(e <= 1e-6, "{e}");
        // Output RMS per head equals norm.weight (y ⊙ gate normalised, then scaled), up to the
        // norm's eps (inputs are scaled so that the mean square of y ⊙ gate is well above 1e-5).
        let (y, _) = m.forward_seq(&u, None, &ForwardOptions::default())?;
        let y = y.reshape((1, 9, 2, 8))?;
        let rms = y.sqr()?.mean(3)?.sqrt()?.flatten_all()?.to_vec1::<f32>()?;
        for (i, r) in rms.iter().enumerate() {
            let expect = src.output_rms[i % 2] as f32;
            assert!(
                (r - expect).abs() <= 1e-3 * expect,
                "head {}: rms {r} vs {expect}",
                i % 2
            );
        }
        // Wrong sizes are rejected with the numbers.
        let bad = AttnSource {
            distance: vec![1.0],
            ..src
        };
        let err = MambaMixer::init_from_attention(&bad, &cfg).unwrap_err();
        assert!(err.to_string().contains("1 distances"), "{err}");
        Ok(())
    }

    #[test]
    fn state_bytes_match_formula_and_tensors() -> Result<()> {
        for cfg in [
            tiny_cfg(),
            MambaConfig {
                n_groups: 1,
                group_size: 3,
                head_dim: 64,
                state_size: 64,
                conv_kernel: 4,
                d_model: 576,
            },
        ] {
            let m = MambaMixer::init_random(&cfg, 0, &Device::Cpu)?;
            for batch in [1usize, 3] {
                let st = m.new_state(batch, &Device::Cpu)?;
                let (g, gg, p, ns, k) = (
                    cfg.group_size,
                    cfg.n_groups,
                    cfg.head_dim,
                    cfg.state_size,
                    cfg.conv_kernel,
                );
                let formula =
                    batch * (g * gg * p * ns * 4 + (gg * p + gg * ns + g * gg * ns) * (k - 1) * 4);
                assert_eq!(cfg.state_bytes(batch), formula);
                assert_eq!(st.bytes(), formula);
                assert_eq!(
                    cfg.state_bytes(1),
                    gg * crate::plan::mixer_state_bytes(g, p, ns, k)
                );
            }
        }
        assert_eq!(
            MambaConfig {
                n_groups: 1,
                group_size: 3,
                head_dim: 64,
                state_size: 64,
                conv_kernel: 4,
                d_model: 576
            }
            .state_bytes(1),
            52_992
        );
        Ok(())
    }

    #[test]
    fn load_checks_shapes_and_round_trips() -> Result<()> {
        let m = tiny_mixer(41)?;
        let prefix = "model.layers.2.mixer";
        let mut map: std::collections::HashMap<String, Tensor> =
            m.tensors(prefix).into_iter().collect();
        let w = Weights::new(map.clone(), Default::default());
        let back = MambaMixer::load(&w, prefix, &m.cfg)?;
        w.finish()?;
        for (a, b) in m.params().iter().zip(back.params()) {
            assert_eq!(max_abs(a, b)?.0, 0.0);
        }
        map.insert(
            format!("{prefix}.A_log"),
            Tensor::zeros(5, DType::F32, &Device::Cpu)?,
        );
        let err =
            MambaMixer::load(&Weights::new(map, Default::default()), prefix, &m.cfg).unwrap_err();
        assert!(err.to_string().contains("A_log"), "{err}");
        Ok(())
    }

    /// Timing at SmolLM2-like sizes (d=576, G=1, g=3, P=N=64). Not a test of speed:
    /// `cargo test --release --lib mamba::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() -> Result<()> {
        let cfg = MambaConfig {
            n_groups: 1,
            group_size: 3,
            head_dim: 64,
            state_size: 64,
            conv_kernel: 4,
            d_model: 576,
        };
        let m = MambaMixer::init_random(&cfg, 0, &Device::Cpu)?;
        let (tm, vars) = m.trainable()?;
        let opts = ForwardOptions {
            differentiable: true,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for t in [256usize, 1024, 4096] {
            let u = uni(&[1, t, 576], -1.0, 1.0, &mut rng)?;
            let scans: &[Scan] = if t <= 1024 {
                &[
                    Scan::Chunked { chunk: 64 },
                    Scan::Chunked { chunk: 32 },
                    Scan::Chunked { chunk: 128 },
                    Scan::Reference,
                ]
            } else {
                &[Scan::Chunked { chunk: 64 }]
            };
            for &scan in scans {
                let reps = 3;
                let mut fwd = f64::MAX;
                let mut fb = f64::MAX;
                for _ in 0..reps {
                    let t0 = std::time::Instant::now();
                    let (y, _) = m.forward_seq_scan(&u, None, &ForwardOptions::default(), scan)?;
                    let _ = y.sum_all()?.to_scalar::<f32>()?;
                    fwd = fwd.min(t0.elapsed().as_secs_f64());
                    let t0 = std::time::Instant::now();
                    let (y, _) = tm.forward_seq_scan(&u, None, &opts, scan)?;
                    let g = y.sqr()?.sum_all()?.backward()?;
                    let _ = g.get(&vars[0].1);
                    fb = fb.min(t0.elapsed().as_secs_f64());
                }
                println!(
                    "t={t:5} {scan:?}: forward {:.1} ms, forward+backward {:.1} ms",
                    fwd * 1e3,
                    fb * 1e3
                );
            }
            // Decode step.
            let mut st = m.new_state(1, &Device::Cpu)?;
            let u1 = u.narrow(1, 0, 1)?;
            let t0 = std::time::Instant::now();
            for _ in 0..100 {
                let _ = m.step(&u1, &mut st)?;
            }
            println!("step: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
        }
        Ok(())
    }
}
