//! Hand-written CPU kernels of the inference and training paths, each tested against the plain
//! reference it replaces (DESIGN.md, "Inference precision").

pub mod decode_attention;
pub mod prefill_attention;
pub mod q8_gemm;
pub mod q8_gemv;
pub mod simd;
pub mod window_attention;

/// Whether the training kernels (`window_attention`, the mixers' fused scan) are switched off in
/// favour of the candle graphs they replace: set `RECURFORMER_GRAPH_KERNELS=1` to time or check the
/// old path side by side (BENCHMARKS.md, "Where a distillation step goes"). Read once.
pub fn graph_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RECURFORMER_GRAPH_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether prefill attention runs the chunked score blocks through candle's GEMM (the path before
/// the tiled kernel, `prefill_attention`) instead of the tiled kernel: set
/// `RECURFORMER_CHUNKED_PREFILL=1` to time or check the old path (`bench --prefill-attention`).
/// Read once.
pub fn chunked_prefill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RECURFORMER_CHUNKED_PREFILL").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether decode attention runs the per-row kernel (one dot product and one axpy per key and
/// query head, the kernel before issue 20's group kernel) instead of the group kernel: set
/// `RECURFORMER_ROW_DECODE_ATTENTION=1` to time or check the old path side by side. Read once.
pub fn row_decode_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RECURFORMER_ROW_DECODE_ATTENTION").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// The contiguous data of a CPU tensor `what`, an input of the op `op`, as a slice.
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// The float types the kernels run in (f32 for training and inference, f64 for gradient checks).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + candle_core::WithDType
{
    fn exp(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}
