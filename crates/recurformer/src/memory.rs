//! Process-wide allocator settings for tensor workloads.
//!
//! A training step or a long prefill allocates and frees hundreds of tensors of a few to a few
//! tens of MiB. glibc's malloc serves such blocks with `mmap` and unmaps them on `free` (its
//! dynamic threshold starts at 128 KiB), so every new tensor is fresh memory that the kernel must
//! fault in and zero page by page. Measured with `perf` on a distillation step of SmolLM2 at 512
//! tokens (2 threads), 27 % of the samples were the kernel's `clear_page_erms`. Keeping freed
//! blocks in the heap cut an isolated step from 9.10 s to 6.88 s (`examples/distill_profile.rs`,
//! one process per setting); inside the training loop, whose allocator has warmed up over many
//! steps, the median distillation step of the 58-minute demo moved only from 6.08 s to 6.00 s
//! (together with another speed-up; BENCHMARKS.md, "Training speed").

/// glibc's largest allowed mmap threshold (32 MiB on 64-bit). Set for completeness: `M_MMAP_MAX`
/// = 0 below serves every block from the heap, so the logits-sized blocks of a training step
/// (50 MB and more at 256 tokens of a 49K vocabulary, several per step) are reused instead of
/// being mapped and faulted in each step: the median 256-token distillation step of the windowed
/// 50 % conversion was 3-18 % shorter in three paired runs (3.64 -> 3.26 s, 3.98 -> 3.37 s,
/// 3.54 -> 3.45 s), the losses equal bit for bit, peak RSS 3.65 -> 3.69 GB (BENCHMARKS.md,
/// "Training speed").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// The heap returns its free top to the system only beyond this much (1 GiB), so the memory of one
/// step is reused by the next instead of being released and faulted in again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Make freed tensor memory reusable instead of returning it to the kernel (glibc `mallopt`; a
/// no-op elsewhere). Call once at program start, before threads allocate. Returns whether the
/// settings were applied.
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tunables; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
