//! The selective scan of the mixer, two ways: `scan_reference`, one token at a time (the
//! recurrence as written), and `scan_chunked`, the SSD algorithm of Dao & Gu (2024), section 6
//! (intra-chunk matmuls, state carried between chunks). The chunked scan is tested against the
//! reference (`tests.rs`). Symbols as in the glossary of `mod.rs`.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

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

/// x (.., in) @ w^T with w (out, in) -> (.., out), as one 2-D GEMM.
pub(crate) fn proj(x: &Tensor, w: &Tensor) -> Result<Tensor> {
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
pub(crate) fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
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
pub(crate) fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((x.relu()? + tail)?)
}

/// (.., G, P) -> (.., G*g, P): each group's vector repeated for its g query heads.
pub(crate) fn per_head(x: &Tensor, g: usize) -> Result<Tensor> {
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
pub(crate) fn ssm_step(
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
