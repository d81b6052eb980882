"""A RecurFormer in PyTorch for transformers (`trust_remote_code`): the base Llama / Qwen2 decoder
in which, per layer, the KV groups the plan replaces are served by a Mamba mixer (and, when the
checkpoint has them, the replaced heads' own attention over sink tokens + a recent window).

This is a second, independent implementation of what the Rust engine computes; it follows the Rust
code (`crates/recurformer/src/model/`) operation for operation, and the method of
`/DESIGN.md` ("The mixer"). Tensor names equal the checkpoint's, so `from_pretrained` loads a
Rust-written `model.safetensors` one to one and `state_dict()` writes one the Rust engine reads.

Glossary (code name: paper symbol, meaning). b batch, t new tokens, d hidden size, hd head dim,
nh query heads, nkv KV heads, g = nh / nkv query heads per KV group. Mixer (Dao & Gu 2024,
"Transformers are SSMs", arXiv:2405.21060, the Mamba-2 form; Gu & Dao 2023, arXiv:2312.00752):
- G replaced KV groups, n = G*g SSM heads (one per replaced query head), P = hd SSM head size,
  N state size, K conv kernel; conv channels C_ch = G*P + G*N + n*N ordered [x | B | C];
- x: x_t (G, P) per token (from W_v), B: B_t (G, N) (from W_k), C: C_t (n, N) (from W_q); x and B
  are shared by a group's g heads (head i reads group i // g, as in grouped-query attention);
- dt: Δ_t = softplus(dt_proj u + dt_bias) (n); A = -exp(A_log) (n); D the skip (n);
- z: the output gate (n*P); norm.weight: scale of the gated RMSNorm (n*P);
- h: the SSM state h_t (n, P, N): h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T, y_t = h_t C_t + D x_t;
  out = rmsnorm_P(y ⊙ silu(z)) ⊙ norm.weight per head, written into the replaced heads' o_proj
  input slots.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.52: the layer class that `gradient_checkpointing_enable` drives
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module

from .configuration_recurformer import RecurformerConfig

# Epsilon of the mixer's gated RMSNorm (`mamba/mod.rs` NORM_EPS; Mamba-2's `RMSNormGated`).
MIXER_NORM_EPS = 1e-5
# Chunk length of the SSD scan (`mamba/mod.rs` DEFAULT_CHUNK).
DEFAULT_CHUNK = 64


# --------------------------------------------------------------------------------------------
# Leaf modules (`layers.rs`)
# --------------------------------------------------------------------------------------------


class RecurformerRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # In f32 (or f64) like the Rust engine (x / sqrt(mean(x^2) + eps) * w).
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(x.dtype) * x).to(dtype)


def rope_inv_freq(config) -> torch.Tensor:
    """hd/2 inverse frequencies after scaling, as `Rope::new` in `layers.rs` (f32)."""
    # Explicitly on the CPU: transformers 5 builds models on the meta device (no data), and this
    # table is a non-persistent buffer that `_init_weights` fills again after loading.
    hd = config.head_dim
    idx = torch.arange(0, hd // 2, dtype=torch.float32, device="cpu")
    theta = torch.tensor(float(config.rope_theta), dtype=torch.float32, device="cpu")
    base = 1.0 / torch.pow(theta, 2 * idx / hd)
    s = config.rope_scaling_params
    kind = (s or {}).get("rope_type", (s or {}).get("type", "default"))
    if s is None or kind in ("default", "none"):
        return base
    if kind == "linear":
        return base / float(s["factor"])
    if kind == "factors":
        return base / torch.tensor(s["factors"], dtype=torch.float32, device="cpu")
    if kind == "llama3":
        # transformers' `_compute_llama3_parameters`: long wavelengths divided by `factor`, short
        # ones kept, the band between interpolated.
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / lo, old / hi
        out = []
        for f in base.tolist():
            f = torch.tensor(f, dtype=torch.float32, device="cpu")
            wavelen = 2.0 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1.0 - smooth) * f / factor + smooth * f)
        return torch.stack(out).float()
    raise ValueError(f"rope scaling {kind!r} is not supported (linear, llama3, factors)")


def rope_tables(inv_freq, positions):
    """cos, sin (t, hd) for integer positions (t): angles p*f in f32, halves repeated."""
    ang = positions.float()[:, None] * inv_freq[None, :]  # (t, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (t, hd)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """'rotate half' layout: x (b, h, t, hd)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class RecurformerMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# Attention: the kept heads (`attention.rs`) and the windowed heads beside a mixer (`window.rs`)
# --------------------------------------------------------------------------------------------


def grouped_attention(q, k, v, mask):
    """Softmax attention of q (b, n, t, hd) against k, v (b, nkv, s, hd), query head i reading KV
    head i // g; `mask` (t, s) bool, True where a key is visible. Returns (b, n, t, hd)."""
    b, n, t, hd = q.shape
    nkv, s = k.shape[1], k.shape[2]
    g = n // nkv
    qg = q.reshape(b, nkv, g * t, hd)  # (b, nkv, g*t, hd): a group's query heads stacked
    scores = torch.matmul(qg, k.transpose(-1, -2)) / math.sqrt(hd)  # (b, nkv, g*t, s)
    scores = scores.view(b, nkv, g, t, s).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    probs = probs.to(q.dtype).view(b, nkv, g * t, s)
    return torch.matmul(probs, v).view(b, n, t, hd)


class RecurformerAttention(nn.Module):
    """`self_attn`: q/k/v of the kept heads only (rows in ascending head / group order; None
    when every group is replaced) and the layer's whole o_proj, columns in original head order."""

    def __init__(self, config, n_heads, n_kv_heads):
        super().__init__()
        d, hd, nh = config.hidden_size, config.head_dim, config.num_attention_heads
        bias = config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, hd
        if n_kv_heads > 0:
            self.q_proj = nn.Linear(d, n_heads * hd, bias=bias)
            self.k_proj = nn.Linear(d, n_kv_heads * hd, bias=bias)
            self.v_proj = nn.Linear(d, n_kv_heads * hd, bias=bias)
        # transformers' `attention_bias` also biases o_proj for Llama; Qwen2 never does (`llama.rs`).
        o_bias = config.attention_bias and config.base_model_type != "qwen2"
        self.o_proj = nn.Linear(nh * hd, d, bias=o_bias)

    def qkv(self, x, cos, sin, proj_q, proj_k, proj_v, n, nkv):
        b, t, _ = x.shape
        hd = self.head_dim
        q = proj_q(x).view(b, t, n, hd).transpose(1, 2)  # (b, n, t, hd)
        k = proj_k(x).view(b, t, nkv, hd).transpose(1, 2)  # (b, nkv, t, hd)
        v = proj_v(x).view(b, t, nkv, hd).transpose(1, 2)  # (b, nkv, t, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def heads_forward(self, x, cos, sin, offset, cache):
        """x (b, t, d) -> the kept heads' outputs (b, t, n*hd), appended to `cache` if any."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin, self.q_proj, self.k_proj, self.v_proj, self.n_heads, self.n_kv_heads)
        if cache is not None:
            k, v = cache.append_kv(k, v)  # (b, nkv, s, hd)
        s = k.shape[2]
        qpos = torch.arange(offset, offset + t, device=x.device)
        kpos = torch.arange(s, device=x.device)
        mask = kpos[None, :] <= qpos[:, None]  # (t, s)
        o = grouped_attention(q, k, v, mask)  # (b, n, t, hd)
        return o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)


class RecurformerLocalAttention(nn.Module):
    """`local_attn`: the replaced heads' own q/k/v attending to the first `sinks` positions and the
    `window` most recent ones (a query's own included); `window.rs` `LocalAttention`. The cache
    keeps only those keys (bounded by sinks + window - 1 tokens)."""

    def __init__(self, config, n_kv_heads, sinks, window):
        super().__init__()
        d, hd, g = config.hidden_size, config.head_dim, config.num_attention_heads // config.num_key_value_heads
        bias = config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = n_kv_heads * g, n_kv_heads, hd
        self.sinks, self.window = sinks, window
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, n_kv_heads * hd, bias=bias)

    def forward(self, x, cos, sin, offset, cache):
        b, t, _ = x.shape
        hd = self.head_dim
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        qpos = torch.arange(offset, offset + t, device=x.device)
        if cache is not None:
            k, v, kpos = cache.append_window(k, v, qpos, self.sinks, self.window)
        else:
            kpos = qpos
        # Visible: not in the future, and a sink or within the window (`window_mask`).
        mask = (kpos[None, :] <= qpos[:, None]) & (
            (kpos[None, :] < self.sinks) | (qpos[:, None] - kpos[None, :] < self.window)
        )
        o = grouped_attention(q, k, v, mask)  # (b, n, t, hd)
        return o.transpose(1, 2).reshape(b, t, self.n_heads * hd)


# --------------------------------------------------------------------------------------------
# The Mamba mixer (`mamba/mod.rs`, `mamba/scan.rs`)
# --------------------------------------------------------------------------------------------


class CausalConv(nn.Module):
    """Depthwise causal conv, weight (C_ch, K) with tap K-1 on the current token, bias (C_ch)."""

    def __init__(self, channels, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))


class GatedNormWeight(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


def scan_sequential(x, dt, A, B, C, D, h):
    """The recurrence one token at a time (`scan_reference`): x (b, t, n, P), dt (b, t, n),
    A (n), B, C (b, t, n, N), D (n), h (b, n, P, N) -> y (b, t, n, P), final h."""
    ys = []
    for i in range(x.shape[1]):
        decay = torch.exp(dt[:, i] * A)[:, :, None, None]  # (b, n, 1, 1)
        dx = x[:, i] * dt[:, i, :, None]  # (b, n, P): Δ_t x_t
        h = h * decay + dx[..., None] * B[:, i, :, None, :]  # (b, n, P, N)
        ys.append((h * C[:, i, :, None, :]).sum(-1) + x[:, i] * D[None, :, None])
    return torch.stack(ys, dim=1), h


def scan_chunked(x, dt, A, B, C, D, h0, chunk=DEFAULT_CHUNK):
    """SSD (Dao & Gu 2024, section 6, listing 1 `ssd_minimal_discrete`), as `scan_chunked` in
    `scan.rs`: chunks of l tokens (the last padded with Δ = 0, which leaves the state unchanged),
    intra-chunk outputs as one masked product, the state carried between chunks by a loop (linear
    in length, like `mamba_ssm`'s `_state_passing_fwd`). Every log-decay is a sum of exactly the
    terms it needs (the stable `segsum`), never a difference of two cumulative sums."""
    b, t, n, p = x.shape
    l = min(chunk, t)
    nc = -(-t // l)
    pad = nc * l - t

    def chunks(z):  # (b, t, n, k) -> (b, n, nc, l, k)
        z = F.pad(z, (0, 0, 0, 0, 0, pad)) if pad else z
        return z.reshape(b, nc, l, n, z.shape[-1]).permute(0, 3, 1, 2, 4)

    xc, bc, cc = chunks(x), chunks(B), chunks(C)
    dtc = chunks(dt[..., None])[..., 0]  # (b, n, nc, l)
    da = dtc * A[None, :, None, None]  # Δ_t A <= 0
    # seg[t, s] = sum_{s<r<=t} Δ_r A (s < t), 0 on the diagonal, masked above it.
    strict = torch.tril(torch.ones(l, l, dtype=torch.bool, device=x.device), -1)
    lower = torch.tril(torch.ones(l, l, dtype=torch.bool, device=x.device))
    terms = da[..., :, None].expand(*da.shape, l).masked_fill(~strict, 0.0)  # [r, s] = Δ_r A, r > s
    seg = torch.cumsum(terms, dim=-2)  # (b, n, nc, l[t], l[s])
    decay = torch.exp(seg).masked_fill(~lower, 0.0)
    cum = torch.cumsum(da, dim=-1)  # sum_{r<=t}
    rev_incl = torch.flip(torch.cumsum(torch.flip(da, [-1]), -1), [-1])  # sum_{r>=s}
    rev = F.pad(rev_incl[..., 1:], (0, 1))  # sum_{r>s}
    total = cum[..., -1]  # (b, n, nc)

    # 1. intra-chunk: y_diag[t] = sum_{s<=t} (C_t·B_s) decay[t,s] Δ_s x_s
    cb = torch.einsum("bhcln,bhcsn->bhcls", cc, bc)
    y_diag = torch.einsum("bhcls,bhcsp->bhclp", cb * decay * dtc[..., None, :], xc)
    # 2. each chunk's own state: S_c = sum_s exp(sum_{r>s} Δ_r A) Δ_s x_s B_s^T
    w = torch.exp(rev) * dtc  # (b, n, nc, l)
    states = torch.einsum("bhclp,bhcln->bhcpn", xc * w[..., None], bc)
    # 3. carry the state across chunks
    h = h0
    h_in = []
    for ci in range(nc):
        h_in.append(h)
        h = h * torch.exp(total[:, :, ci])[..., None, None] + states[:, :, ci]
    h_in = torch.stack(h_in, dim=2)  # (b, n, nc, P, N)
    # 4. outputs from the state entering each chunk: exp(sum_{r<=t} Δ_r A) C_t h_in
    y_off = torch.einsum("bhcln,bhcpn->bhclp", cc, h_in) * torch.exp(cum)[..., None]
    y = y_diag + y_off + xc * D[None, :, None, None, None]
    y = y.permute(0, 2, 3, 1, 4).reshape(b, nc * l, n, p)[:, :t]
    return y, h


class RecurformerMixer(nn.Module):
    """One Mamba-2-form mixer standing in for a layer's replaced KV groups (`MambaMixer`)."""

    def __init__(self, config, n_groups, state_size, conv_kernel):
        super().__init__()
        d, p = config.hidden_size, config.head_dim
        g = config.num_attention_heads // config.num_key_value_heads
        n = n_groups * g
        self.n_groups, self.group_size, self.head_dim = n_groups, g, p
        self.state_size, self.conv_kernel, self.n_heads = state_size, conv_kernel, n
        self.conv_channels = n_groups * p + n_groups * state_size + n * state_size
        self.x_proj = nn.Linear(d, n_groups * p, bias=False)
        self.B_proj = nn.Linear(d, n_groups * state_size, bias=False)
        self.C_proj = nn.Linear(d, n * state_size, bias=False)
        self.conv = CausalConv(self.conv_channels, conv_kernel)
        self.dt_proj = nn.Linear(d, n, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(n))
        self.A_log = nn.Parameter(torch.zeros(n))
        self.D = nn.Parameter(torch.ones(n))
        self.z_proj = nn.Linear(d, n * p, bias=False)
        self.z_bias = nn.Parameter(torch.zeros(n * p))
        self.norm = GatedNormWeight(n * p)

    @staticmethod
    def state_dtype(dtype):
        """The state is kept in f32 (DESIGN.md: the scan state in f32), or f64 for an f64 model."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def new_state(self, batch, device, dtype=torch.float32):
        """Zero state: conv (b, C_ch, K-1), ssm (b, n, P, N)."""
        dt = self.state_dtype(dtype)
        conv = torch.zeros(batch, self.conv_channels, self.conv_kernel - 1, device=device, dtype=dt)
        ssm = torch.zeros(batch, self.n_heads, self.head_dim, self.state_size, device=device, dtype=dt)
        return conv, ssm

    def forward(self, u, state=None, scan="chunked", chunk=DEFAULT_CHUNK):
        """u (b, t, d) -> (out (b, t, n*P), (conv, ssm) final state); continues from `state`."""
        b, t, _ = u.shape
        G, g, P, N, K, n = self.n_groups, self.group_size, self.head_dim, self.state_size, self.conv_kernel, self.n_heads
        if state is None:
            state = self.new_state(b, u.device, u.dtype)
        conv_state, ssm_state = state
        xbc = torch.cat([self.x_proj(u), self.B_proj(u), self.C_proj(u)], dim=-1)  # (b, t, C_ch)
        # Causal depthwise conv over [previous K-1 inputs | new inputs]; tap K-1 on the current token.
        conv_in = torch.cat([conv_state.to(u.dtype).transpose(1, 2), xbc], dim=1)  # (b, t+K-1, C_ch)
        sdt = self.state_dtype(u.dtype)
        new_conv = conv_in[:, t : t + K - 1].transpose(1, 2).to(sdt)  # (b, C_ch, K-1)
        w = self.conv.weight
        acc = conv_in[:, 0:t] * w[:, 0]
        for tap in range(1, K):
            acc = acc + conv_in[:, tap : tap + t] * w[:, tap]
        xbc = F.silu(acc + self.conv.bias)  # (b, t, C_ch)
        x = xbc[..., : G * P].reshape(b, t, G, P).repeat_interleave(g, dim=2)  # (b, t, n, P)
        Bm = xbc[..., G * P : G * P + G * N].reshape(b, t, G, N).repeat_interleave(g, dim=2)  # (b, t, n, N)
        Cm = xbc[..., G * P + G * N :].reshape(b, t, n, N)  # (b, t, n, N)
        dt = F.softplus(self.dt_proj(u) + self.dt_bias)  # (b, t, n)
        A = -torch.exp(self.A_log)  # (n)
        h0 = ssm_state.to(u.dtype)
        if scan == "sequential" or t == 1:
            y, h = scan_sequential(x, dt, A, Bm, Cm, self.D, h0)
        else:
            y, h = scan_chunked(x, dt, A, Bm, Cm, self.D, h0, chunk)  # (b, t, n, P), (b, n, P, N)
        # Output gate and gated RMSNorm per head (Mamba-2 `RMSNormGated`, norm_before_gate=False).
        z = (self.z_proj(u) + self.z_bias).view(b, t, n, P)
        v = y * F.silu(z)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + MIXER_NORM_EPS)
        out = (v * self.norm.weight.view(n, P)).reshape(b, t, n * P)
        return out, (new_conv, h.to(sdt))


# --------------------------------------------------------------------------------------------
# Cache (`cache.rs`): per layer the kept heads' KV, the mixer's conv + SSM state, and the
# windowed heads' bounded KV
# --------------------------------------------------------------------------------------------


class RecurformerLayerCache:
    def __init__(self):
        self.k = self.v = None  # (b, nkv_kept, s, hd)
        self.conv = self.ssm = None
        self.wk = self.wv = self.wpos = None  # windowed heads: kept keys and their positions

    def append_kv(self, k, v):
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def append_window(self, k, v, qpos, sinks, window):
        """All keys the new queries may need (b, nkv, s, hd) with their positions (s); then keeps
        only the sinks and the window - 1 most recent positions (`WindowKv::append`)."""
        if self.wk is not None:
            k = torch.cat([self.wk, k], dim=2)
            v = torch.cat([self.wv, v], dim=2)
            pos = torch.cat([self.wpos, qpos])
        else:
            pos = qpos
        end = int(qpos[-1]) + 1
        keep = (pos < sinks) | (pos >= end - (window - 1))
        self.wk, self.wv, self.wpos = k[:, :, keep], v[:, :, keep], pos[keep]
        return k, v, pos

    def bytes(self):
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.conv, self.ssm, self.wk, self.wv) if x is not None)


class RecurformerCache:
    """The hybrid cache of one batch of sequences. `seen` is the position of the next token."""

    is_compileable = False

    @property
    def is_linear(self):
        return [False] * len(self.layers)

    def __init__(self, num_layers):
        self.layers = [RecurformerLayerCache() for _ in range(num_layers)]
        self.seen = 0

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def get_max_cache_shape(self, layer_idx=0):
        return -1

    def __len__(self):
        return len(self.layers)

    def bytes(self):
        return sum(l.bytes() for l in self.layers)

    def reorder_cache(self, beam_idx):
        for l in self.layers:
            for name in ("k", "v", "conv", "ssm", "wk", "wv"):
                x = getattr(l, name)
                if x is not None:
                    setattr(l, name, x.index_select(0, beam_idx.to(x.device)))


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------


class RecurformerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        sec = config.recurformer
        lp = sec["plan"]["layers"][layer_idx]
        mx = sec["mixer"]
        d, eps = config.hidden_size, config.rms_norm_eps
        g = config.num_attention_heads // config.num_key_value_heads
        self.layer_idx = layer_idx
        self.attention_heads = list(lp["attention_heads"])
        self.mamba_heads = list(lp["mamba_heads"])
        n_kept, n_mamba = len(lp["attention_groups"]), len(lp["mamba_groups"])
        self.input_layernorm = RecurformerRMSNorm(d, eps)
        self.self_attn = RecurformerAttention(config, n_kept * g, n_kept)
        self.mixer = RecurformerMixer(config, n_mamba, mx["state_size"], mx["conv_kernel"]) if n_mamba else None
        local = mx.get("local")
        self.local_attn = (
            RecurformerLocalAttention(config, n_mamba, local["sinks"], local["window"]) if (local and n_mamba) else None
        )
        self.post_attention_layernorm = RecurformerRMSNorm(d, eps)
        self.mlp = RecurformerMLP(config)
        # The forward concatenates [kept heads..., replaced heads...]; `o_perm` puts the hd-wide
        # slots back in head order before o_proj (the Rust side reorders o_proj's columns instead).
        self.register_buffer("o_perm", self.head_order(), persistent=False)
        self.mixer_scan = "chunked"

    def head_order(self):
        """Index of each head's slot in [kept heads..., replaced heads...]."""
        order = self.attention_heads + self.mamba_heads
        inv = [0] * len(order)
        for i, h in enumerate(order):
            inv[h] = i
        return torch.tensor(inv, dtype=torch.long, device="cpu")

    def forward(self, x, cos, sin, offset, cache: Optional[RecurformerLayerCache] = None):
        b, t, _ = x.shape
        hd = self.self_attn.head_dim
        h = self.input_layernorm(x)
        parts = []
        if self.self_attn.n_kv_heads > 0:
            parts.append(self.self_attn.heads_forward(h, cos, sin, offset, cache))  # (b, t, kept*hd)
        if self.mixer is not None:
            state = (cache.conv, cache.ssm) if (cache is not None and cache.conv is not None) else None
            y, new_state = self.mixer(h, state, scan=self.mixer_scan)  # (b, t, replaced*hd)
            if cache is not None:
                cache.conv, cache.ssm = new_state
            if self.local_attn is not None:
                y = y + self.local_attn(h, cos, sin, offset, cache)
            parts.append(y)
        o_in = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (b, t, nh*hd), [kept..., replaced...]
        nh = o_in.shape[-1] // hd
        o_in = o_in.view(b, t, nh, hd).index_select(2, self.o_perm).reshape(b, t, nh * hd)  # head order
        x = x + self.self_attn.o_proj(o_in)
        return x + self.mlp(self.post_attention_layernorm(x))


class RecurformerPreTrainedModel(PreTrainedModel):
    config_class = RecurformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RecurformerDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = False
    _supports_flash_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        # Only for tensors a checkpoint does not provide (a RecurFormer checkpoint provides all):
        # Llama's normal(0, 0.02) for linear layers and embeddings.
        # The non-persistent buffers (computed, never stored) are filled here: transformers 5
        # creates the model on the meta device and initialises what the checkpoint lacks.
        std = 0.02
        if isinstance(module, RecurformerModel):
            module.inv_freq.copy_(rope_inv_freq(self.config).to(module.inv_freq.device))
        elif isinstance(module, RecurformerDecoderLayer):
            module.o_perm.copy_(module.head_order().to(module.o_perm.device))
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)


class RecurformerModel(RecurformerPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RecurformerDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RecurformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values=None,
        **kwargs,
    ):
        # transformers 5 names the cache `cache` (`past_key_values` before): accept both.
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, d)
        b, t, _ = x.shape
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not isinstance(cache, RecurformerCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a RecurFormer continues only from its own RecurformerCache")
            cache = RecurformerCache(len(self.layers)) if use_cache else None
        if attention_mask is not None and not bool(attention_mask.all()):
            # The recurrent state has no notion of a masked token: padded batches are not supported.
            raise ValueError("RecurFormer does not support padding (attention_mask with zeros)")
        offset = cache.seen if cache is not None else 0
        positions = torch.arange(offset, offset + t, device=x.device)
        cos, sin = rope_tables(self.inv_freq.to(x.device), positions)  # (t, hd)
        states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if states is not None:
                states.append(x)
            lc = cache.layers[i] if cache is not None else None
            x = layer(x, cos=cos, sin=sin, offset=offset, cache=lc)
        if cache is not None:
            cache.seen += t
        x = self.norm(x)
        if states is not None:
            states.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache else None,
            hidden_states=tuple(states) if states is not None else None,
        )


class RecurformerForCausalLM(RecurformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = RecurformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_mixer_scan(self, scan):
        """'chunked' (SSD, the default) or 'sequential' (the token-by-token reference)."""
        for layer in self.model.layers:
            layer.mixer_scan = scan

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # generate() must not hand us a DynamicCache: the first forward creates a RecurformerCache.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        model_inputs = {"cache": cache, "use_cache": kwargs.get("use_cache", True)}
        if isinstance(cache, RecurformerCache) and cache.seen > 0:
            # Feed only the tokens the cache has not seen yet.
            model_inputs["input_ids"] = input_ids[:, cache.seen :]
        elif inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs
