//! The instruction set the attention kernels run on, chosen at run time, and the row primitives
//! they share over the two key / value element types of the cache (f32 and f16).
//!
//! The machines this project runs on differ (AMD EPYC, Intel Xeon; issue 20), so nothing here is
//! chosen at compile time: [`Isa::detect`] asks the CPU (`is_x86_feature_detected!`) once, and each
//! kernel runs its loops inside a function compiled for that set (`#[target_feature]`), with a
//! portable scalar fallback for everything else. An f16 row is converted to f32 in registers as it
//! is loaded (F16C `vcvtph2ps`, 8 lanes under AVX2, 16 under AVX-512F): the cache is read at half
//! the bytes, and every sum is still formed in f32.

use half::f16;

/// An instruction set a kernel can run on, from the most portable up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C: 8 f32 lanes.
    Avx2,
    /// x86-64 with AVX-512F and AVX-512VL besides: 16 f32 lanes, 32 registers.
    Avx512,
}

impl Isa {
    /// The best set this CPU supports, asked once. `RECURFORMER_ISA=scalar|avx2` caps it (to time
    /// or check a lower path on a machine that has more); a cap above what the CPU has is ignored.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::available().into_iter().max().unwrap_or(Isa::Scalar);
            let cap = match std::env::var("RECURFORMER_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            best.min(cap)
        })
    }

    /// Every set this CPU can run (tests run the kernels on each).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
                // AVX-512VL besides F: the 256-bit instructions the kernels mix in (the lane
                // sums) may then use all 32 registers; without it they are VEX-encoded, limited to
                // the first 16, and the register allocator spilled the group decode kernel's tiles
                // (every AVX-512 x86 CPU but Knights Landing has VL).
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    v.push(Isa::Avx512);
                }
            }
        }
        v
    }
}

/// An element type of the cached keys and values.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The candle storage slice of this type, if `s` holds it.
    fn slice(s: &candle_core::CpuStorage) -> Option<&[Self]>;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn slice(s: &candle_core::CpuStorage) -> Option<&[f32]> {
        match s {
            candle_core::CpuStorage::F32(d) => Some(d),
            _ => None,
        }
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn slice(s: &candle_core::CpuStorage) -> Option<&[f16]> {
        match s {
            candle_core::CpuStorage::F16(d) => Some(d),
            _ => None,
        }
    }
}

/// Row operations of one instruction set on rows of `E`: the inner loops of the decode kernel.
/// Implementations for the SIMD sets are only called from code compiled for that set.
pub trait RowOps<E: KvElem> {
    /// q · k over the common length.
    fn dot(q: &[f32], k: &[E]) -> f32;
    /// acc += p * v.
    fn axpy(acc: &mut [f32], p: f32, v: &[E]);
    /// dst = v as f32.
    fn load(dst: &mut [f32], v: &[E]);
}

/// The portable implementation.
pub struct Scalar;

impl<E: KvElem> RowOps<E> for Scalar {
    #[inline(always)]
    fn dot(q: &[f32], k: &[E]) -> f32 {
        // Eight independent accumulators let the compiler vectorise without reassociating one sum.
        let mut acc = [0f32; 8];
        let n = q.len().min(k.len());
        let n8 = n / 8 * 8;
        for i in (0..n8).step_by(8) {
            for l in 0..8 {
                acc[l] += q[i + l] * k[i + l].to_f32();
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in n8..n {
            s += q[i] * k[i].to_f32();
        }
        s
    }

    #[inline(always)]
    fn axpy(acc: &mut [f32], p: f32, v: &[E]) {
        for (x, y) in acc.iter_mut().zip(v) {
            *x += p * y.to_f32();
        }
    }

    #[inline(always)]
    fn load(dst: &mut [f32], v: &[E]) {
        for (x, y) in dst.iter_mut().zip(v) {
            *x = y.to_f32();
        }
    }
}

/// Whole registers of one instruction set, for kernels that keep a tile of sums in registers
/// across many rows (the group decode kernel, `decode_attention`): `V` is one register of `N` f32
/// lanes. The methods are only called from code compiled for that set (for the SIMD sets, inside
/// a `#[target_feature]` function that checked the CPU first); pointers must be valid for `N`
/// elements.
pub trait Lanes<E: KvElem> {
    /// One register.
    type V: Copy;
    /// f32 lanes in `V`.
    const N: usize;
    /// Whether the set has 32 registers (AVX-512) rather than 16: decides how large a tile of
    /// sums fits without spilling.
    const WIDE: bool;
    fn zero() -> Self::V;
    fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p` valid for `N` reads.
    unsafe fn load(p: *const f32) -> Self::V;
    /// `N` cached elements widened to f32.
    /// # Safety
    /// `p` valid for `N` reads.
    unsafe fn load_kv(p: *const E) -> Self::V;
    /// a * b + c.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// # Safety
    /// `p` valid for `N` writes.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The lane sums of four registers, in one transposed reduction (cheaper than four
    /// horizontal sums: the adds are shared).
    fn hsum4(v: [Self::V; 4]) -> [f32; 4];
}

/// Four f32 lanes as plain arrays: the portable code, which the compiler vectorises for the
/// baseline set (SSE2 on x86-64).
impl<E: KvElem> Lanes<E> for Scalar {
    type V = [f32; 4];
    const N: usize = 4;
    const WIDE: bool = false;
    #[inline(always)]
    fn zero() -> [f32; 4] {
        [0.0; 4]
    }
    #[inline(always)]
    fn splat(x: f32) -> [f32; 4] {
        [x; 4]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 4] {
        std::array::from_fn(|i| *p.add(i))
    }
    #[inline(always)]
    unsafe fn load_kv(p: *const E) -> [f32; 4] {
        std::array::from_fn(|i| (*p.add(i)).to_f32())
    }
    #[inline(always)]
    fn fma(a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 4]) {
        for (i, x) in v.into_iter().enumerate() {
            *p.add(i) = x;
        }
    }
    #[inline(always)]
    fn hsum4(v: [[f32; 4]; 4]) -> [f32; 4] {
        v.map(|x| (x[0] + x[1]) + (x[2] + x[3]))
    }
}

/// Asks for the 64-byte lines of `len` elements from `p` to be brought towards the core (x86's
/// `prefetcht0`; nothing elsewhere). A prefetch never faults and reads nothing visible.
#[inline(always)]
pub fn prefetch_row<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = len * std::mem::size_of::<T>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch neither faults nor reads architecturally; SSE is in the
            // x86-64 baseline.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    (p as *const i8).wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};
/// Elsewhere the SIMD sets are never detected; the names stand for the portable code.
#[cfg(not(target_arch = "x86_64"))]
pub type Avx2 = Scalar;
#[cfg(not(target_arch = "x86_64"))]
pub type Avx512 = Scalar;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KvElem, Lanes, RowOps};
    use half::f16;
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C, 8 lanes.
    pub struct Avx2;
    /// AVX-512F (+ the AVX2 set), 16 lanes.
    pub struct Avx512;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld8_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// Eight f16 converted to f32 in a register (F16C `vcvtph2ps`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld8_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn ld16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    /// Sixteen f16 converted to f32 in a register.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn ld16_f16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum8(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps::<1>(x, x));
        _mm_cvtss_f32(x)
    }

    // One body per (set, element type); the loads are the only difference between f32 and f16.
    macro_rules! avx2_rows {
        ($t:ty, $ld:ident, $dot:ident, $axpy:ident, $load:ident) => {
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $dot(q: &[f32], k: &[$t]) -> f32 {
                let n = q.len().min(k.len());
                let (qp, kp) = (q.as_ptr(), k.as_ptr());
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 16 <= n {
                    a0 = _mm256_fmadd_ps(ld8_f32(qp.add(i)), $ld(kp.add(i)), a0);
                    a1 = _mm256_fmadd_ps(ld8_f32(qp.add(i + 8)), $ld(kp.add(i + 8)), a1);
                    i += 16;
                }
                if i + 8 <= n {
                    a0 = _mm256_fmadd_ps(ld8_f32(qp.add(i)), $ld(kp.add(i)), a0);
                    i += 8;
                }
                let mut s = hsum8(_mm256_add_ps(a0, a1));
                while i < n {
                    s += q[i] * k[i].to_f32();
                    i += 1;
                }
                s
            }

            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $axpy(acc: &mut [f32], p: f32, v: &[$t]) {
                let n = acc.len().min(v.len());
                let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
                let pv = _mm256_set1_ps(p);
                let mut i = 0;
                while i + 8 <= n {
                    let x = _mm256_fmadd_ps(pv, $ld(vp.add(i)), _mm256_loadu_ps(ap.add(i)));
                    _mm256_storeu_ps(ap.add(i), x);
                    i += 8;
                }
                while i < n {
                    acc[i] += p * v[i].to_f32();
                    i += 1;
                }
            }

            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $load(dst: &mut [f32], v: &[$t]) {
                let n = dst.len().min(v.len());
                let (dp, vp) = (dst.as_mut_ptr(), v.as_ptr());
                let mut i = 0;
                while i + 8 <= n {
                    _mm256_storeu_ps(dp.add(i), $ld(vp.add(i)));
                    i += 8;
                }
                while i < n {
                    dst[i] = v[i].to_f32();
                    i += 1;
                }
            }

            impl RowOps<$t> for Avx2 {
                #[inline(always)]
                fn dot(q: &[f32], k: &[$t]) -> f32 {
                    // SAFETY: `Avx2` row ops are only called from code that checked the CPU
                    // (`Isa::detect` / `Isa::available`) before entering it.
                    unsafe { $dot(q, k) }
                }
                #[inline(always)]
                fn axpy(acc: &mut [f32], p: f32, v: &[$t]) {
                    // SAFETY: as above.
                    unsafe { $axpy(acc, p, v) }
                }
                #[inline(always)]
                fn load(dst: &mut [f32], v: &[$t]) {
                    // SAFETY: as above.
                    unsafe { $load(dst, v) }
                }
            }
        };
    }

    macro_rules! avx512_rows {
        ($t:ty, $ld:ident, $dot:ident, $axpy:ident, $load:ident) => {
            #[inline]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            unsafe fn $dot(q: &[f32], k: &[$t]) -> f32 {
                let n = q.len().min(k.len());
                let (qp, kp) = (q.as_ptr(), k.as_ptr());
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut i = 0;
                while i + 32 <= n {
                    a0 = _mm512_fmadd_ps(ld16_f32(qp.add(i)), $ld(kp.add(i)), a0);
                    a1 = _mm512_fmadd_ps(ld16_f32(qp.add(i + 16)), $ld(kp.add(i + 16)), a1);
                    i += 32;
                }
                if i + 16 <= n {
                    a0 = _mm512_fmadd_ps(ld16_f32(qp.add(i)), $ld(kp.add(i)), a0);
                    i += 16;
                }
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                while i < n {
                    s += q[i] * k[i].to_f32();
                    i += 1;
                }
                s
            }

            #[inline]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            unsafe fn $axpy(acc: &mut [f32], p: f32, v: &[$t]) {
                let n = acc.len().min(v.len());
                let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
                let pv = _mm512_set1_ps(p);
                let mut i = 0;
                while i + 16 <= n {
                    let x = _mm512_fmadd_ps(pv, $ld(vp.add(i)), _mm512_loadu_ps(ap.add(i)));
                    _mm512_storeu_ps(ap.add(i), x);
                    i += 16;
                }
                while i < n {
                    acc[i] += p * v[i].to_f32();
                    i += 1;
                }
            }

            #[inline]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            unsafe fn $load(dst: &mut [f32], v: &[$t]) {
                let n = dst.len().min(v.len());
                let (dp, vp) = (dst.as_mut_ptr(), v.as_ptr());
                let mut i = 0;
                while i + 16 <= n {
                    _mm512_storeu_ps(dp.add(i), $ld(vp.add(i)));
                    i += 16;
                }
                while i < n {
                    dst[i] = v[i].to_f32();
                    i += 1;
                }
            }

            impl RowOps<$t> for Avx512 {
                #[inline(always)]
                fn dot(q: &[f32], k: &[$t]) -> f32 {
                    // SAFETY: `Avx512` row ops are only called from code that checked the CPU.
                    unsafe { $dot(q, k) }
                }
                #[inline(always)]
                fn axpy(acc: &mut [f32], p: f32, v: &[$t]) {
                    // SAFETY: as above.
                    unsafe { $axpy(acc, p, v) }
                }
                #[inline(always)]
                fn load(dst: &mut [f32], v: &[$t]) {
                    // SAFETY: as above.
                    unsafe { $load(dst, v) }
                }
            }
        };
    }

    /// Lane sums of four 8-lane registers: [Σa, Σb, Σc, Σd] with three `vhaddps` and one add
    /// of the two 128-bit halves.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4_8(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b); // a01 a23 b01 b23 | a45 a67 b45 b67
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd); // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// A 16-lane register folded to 8 lanes (low half + high half).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn fold16(v: __m512) -> __m256 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), hi)
    }

    macro_rules! lanes {
        ($set:ty, $v:ty, $n:expr, $wide:expr, $t:ty, $ldkv:ident,
         $zero:ident, $splat:ident, $load:ident, $fma:ident, $store:ident, $hsum4:expr) => {
            impl Lanes<$t> for $set {
                type V = $v;
                const N: usize = $n;
                const WIDE: bool = $wide;
                #[inline(always)]
                fn zero() -> $v {
                    // SAFETY (all methods): only called from code compiled for this set, entered
                    // after the CPU was checked (`Isa::detect` / `Isa::available`).
                    unsafe { $zero() }
                }
                #[inline(always)]
                fn splat(x: f32) -> $v {
                    unsafe { $splat(x) }
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> $v {
                    $load(p)
                }
                #[inline(always)]
                unsafe fn load_kv(p: *const $t) -> $v {
                    $ldkv(p)
                }
                #[inline(always)]
                fn fma(a: $v, b: $v, c: $v) -> $v {
                    unsafe { $fma(a, b, c) }
                }
                #[inline(always)]
                unsafe fn store(p: *mut f32, v: $v) {
                    $store(p, v)
                }
                #[inline(always)]
                fn hsum4(v: [$v; 4]) -> [f32; 4] {
                    let mut out = [0f32; 4];
                    unsafe { _mm_storeu_ps(out.as_mut_ptr(), $hsum4(v)) };
                    out
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn hsum4_avx2(v: [__m256; 4]) -> __m128 {
        hsum4_8(v[0], v[1], v[2], v[3])
    }
    #[inline(always)]
    unsafe fn hsum4_avx512(v: [__m512; 4]) -> __m128 {
        hsum4_8(fold16(v[0]), fold16(v[1]), fold16(v[2]), fold16(v[3]))
    }

    lanes!(
        Avx2,
        __m256,
        8,
        false,
        f32,
        ld8_f32,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        hsum4_avx2
    );
    lanes!(
        Avx2,
        __m256,
        8,
        false,
        f16,
        ld8_f16,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        hsum4_avx2
    );
    lanes!(
        Avx512,
        __m512,
        16,
        true,
        f32,
        ld16_f32,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        hsum4_avx512
    );
    lanes!(
        Avx512,
        __m512,
        16,
        true,
        f16,
        ld16_f16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        hsum4_avx512
    );

    avx2_rows!(f32, ld8_f32, dot8_f32, axpy8_f32, load8_f32);
    avx2_rows!(f16, ld8_f16, dot8_f16, axpy8_f16, load8_f16);
    avx512_rows!(f32, ld16_f32, dot16_f32, axpy16_f32, load16_f32);
    avx512_rows!(f16, ld16_f16, dot16_f16, axpy16_f16, load16_f16);
}

/// exp(x) for x <= 0 in straight-line code the compiler vectorises (libm's `expf` does not):
/// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
/// < 2e-7 on that interval), 2^n assembled in the exponent bits. Below -87 (and for -inf, a
/// masked score) the result is exactly 0.
///
/// n is rounded, and read back as an integer, by adding 1.5 * 2^23: the sum's low mantissa bits
/// then hold n in two's complement (the classic "magic number" rounding). `round()` and `n as
/// i32` did the same, but a float-to-int `as` saturates and maps NaN to 0, which the compiler
/// wrote as a scalar convert and two conditional moves per lane: it was a fifth of the decode
/// kernel's time (issue 20).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.max(-87.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC; // round to nearest: n in [-126, 0]
    let n = t - MAGIC;
    // ln 2 split in a part exact in f32 and the remainder (Cody & Waite), so r stays accurate.
    let r = (xc - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // t's bits minus MAGIC's are n (as a wrapped u32); + 127 is 2^n's biased exponent.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// max(init, max of `row`), in 16 independent lanes: a plain `fold(f32::max)` is a serial chain
/// the compiler may not reorder, which left the prefill kernel's softmax scalar.
#[inline(always)]
pub fn row_max(row: &[f32], init: f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = row.chunks_exact(16);
    for ch in &mut chunks {
        for i in 0..16 {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    let mut m = init;
    for &x in chunks.remainder().iter().chain(&acc) {
        if x > m {
            m = x;
        }
    }
    m
}

/// Replaces each x of `row` by exp(x - mx) (x <= mx) and returns their sum, summed in 16
/// independent lanes (one running sum is a serial chain that keeps the loop scalar).
#[inline(always)]
pub fn exp_shift_sum(row: &mut [f32], mx: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - mx);
    }
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for ch in &mut chunks {
        for i in 0..16 {
            acc[i] += ch[i];
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_agree<O: RowOps<f32> + RowOps<f16>>(name: &str) {
        // Lengths around the 8- and 16-lane steps, so the tails run too.
        for n in [1usize, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100] {
            let q: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let k32: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.75).collect();
            let k16: Vec<f16> = k32.iter().map(|&x| f16::from_f32(x)).collect();
            let want: f64 = q.iter().zip(&k32).map(|(a, b)| (a * b) as f64).sum();
            // These values are exact in f16, so both element types give the same products.
            for got in [O::dot(&q, &k32), O::dot(&q, &k16)] {
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "{name} dot n={n}: {got} vs {want}"
                );
            }
            let mut a = q.clone();
            O::axpy(&mut a, 0.5, &k16);
            let mut l = vec![0f32; n];
            O::load(&mut l, &k16);
            for i in 0..n {
                assert!(
                    (a[i] - (q[i] + 0.5 * k32[i])).abs() < 1e-5,
                    "{name} axpy n={n}"
                );
                assert_eq!(l[i], k32[i], "{name} load n={n}");
            }
        }
    }

    #[test]
    fn row_ops_of_every_available_set_agree_with_plain_sums() {
        let sets = Isa::available();
        println!("instruction sets here: {sets:?}");
        rows_agree::<Scalar>("scalar");
        #[cfg(target_arch = "x86_64")]
        {
            if sets.contains(&Isa::Avx2) {
                rows_agree::<Avx2>("avx2");
            }
            if sets.contains(&Isa::Avx512) {
                rows_agree::<Avx512>("avx512");
            }
        }
    }

    /// Four registers of `O` filled from f16 rows, multiplied by f32 rows, summed in lanes.
    fn lanes_agree<O: Lanes<f32> + Lanes<f16>>(name: &str) {
        let n = <O as Lanes<f32>>::N;
        let q: Vec<f32> = (0..4 * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let k32: Vec<f32> = (0..4 * n)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.75)
            .collect();
        let k16: Vec<f16> = k32.iter().map(|&x| f16::from_f32(x)).collect();
        let want: Vec<f32> = (0..4)
            .map(|r| (0..n).map(|i| q[r * n + i] * k32[r * n + i]).sum::<f32>() + 0.5)
            .collect();
        // SAFETY: each pointer has n elements from r * n; `O` is a set this CPU has (the caller
        // checked), and code compiled for the baseline may call it: the methods are compiled
        // for their set.
        let (g32, g16) = unsafe {
            let f32s: [<O as Lanes<f32>>::V; 4] = std::array::from_fn(|r| {
                let a = <O as Lanes<f32>>::load(q.as_ptr().add(r * n));
                let b = <O as Lanes<f32>>::load_kv(k32.as_ptr().add(r * n));
                <O as Lanes<f32>>::fma(a, b, <O as Lanes<f32>>::splat(0.5 / n as f32))
            });
            let f16s: [<O as Lanes<f16>>::V; 4] = std::array::from_fn(|r| {
                let a = <O as Lanes<f16>>::load(q.as_ptr().add(r * n));
                let b = <O as Lanes<f16>>::load_kv(k16.as_ptr().add(r * n));
                <O as Lanes<f16>>::fma(a, b, <O as Lanes<f16>>::splat(0.5 / n as f32))
            });
            let mut back = vec![0f32; n];
            <O as Lanes<f16>>::store(back.as_mut_ptr(), f16s[0]);
            let first: f32 = back.iter().sum();
            assert!(
                (first - want[0]).abs() < 1e-4,
                "{name} store: {first} vs {}",
                want[0]
            );
            (
                <O as Lanes<f32>>::hsum4(f32s),
                <O as Lanes<f16>>::hsum4(f16s),
            )
        };
        for r in 0..4 {
            for got in [g32[r], g16[r]] {
                assert!(
                    (got - want[r]).abs() < 1e-4,
                    "{name} hsum4 row {r}: {got} vs {}",
                    want[r]
                );
            }
        }
    }

    #[test]
    fn lanes_of_every_available_set_sum_like_plain_loops() {
        let sets = Isa::available();
        lanes_agree::<Scalar>("scalar");
        #[cfg(target_arch = "x86_64")]
        {
            if sets.contains(&Isa::Avx2) {
                lanes_agree::<Avx2>("avx2");
            }
            if sets.contains(&Isa::Avx512) {
                lanes_agree::<Avx512>("avx512");
            }
        }
    }

    #[test]
    fn row_max_and_exp_sum_match_plain_loops() {
        for n in [1usize, 15, 16, 17, 64, 100] {
            let row: Vec<f32> = (0..n).map(|i| -((i * 29 % 13) as f32) * 0.37).collect();
            let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row_max(&row, f32::NEG_INFINITY), want_max, "n={n}");
            assert_eq!(row_max(&row, 5.0), 5.0, "n={n}");
            let mut r = row.clone();
            let sum = exp_shift_sum(&mut r, want_max);
            let want: f32 = row.iter().map(|x| (x - want_max).exp()).sum();
            assert!((sum - want).abs() < 1e-5 * want, "n={n}: {sum} vs {want}");
            assert!((r[0] - (row[0] - want_max).exp()).abs() < 1e-6);
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for i in 0..=100_000 {
            let x = -(i as f32) * 8.7e-4;
            let rel = (exp_nonpositive(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }
}
