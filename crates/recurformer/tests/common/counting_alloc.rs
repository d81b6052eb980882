//! Allocation accounting for the mutation tests: a global allocator (installed by
//! `tests/mutation.rs` only) that counts live bytes per thread, so the driver in `mutate.rs` can
//! bound what one case allocates, and refuses any single request over [`HARD_CAP`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
    /// The seed of the case running on this thread, for the abort message.
    pub static CASE_SEED: Cell<u64> = const { Cell::new(0) };
}

/// Refused outright (the process aborts with the seed printed): no reader may ask for this much
/// at once on these inputs of well under a megabyte.
pub const HARD_CAP: usize = 1 << 30;

/// A global allocator that counts live bytes per thread and refuses single requests over
/// [`HARD_CAP`], naming the case's seed on stderr first (capture is lost on abort). Installed by
/// `tests/mutation.rs` only. Thread-locals with `const` initialisers allocate nothing.
pub struct CountingAlloc;

fn note(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

fn refuse(size: usize) {
    let seed = CASE_SEED.try_with(|s| s.get()).unwrap_or(0);
    let mut buf = [0u8; 160];
    let mut n = 0;
    let mut put = |s: &[u8], buf: &mut [u8; 160]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    let num = |mut x: u64| -> ([u8; 20], usize) {
        let mut d = [0u8; 20];
        let mut i = 20;
        loop {
            i -= 1;
            d[i] = b'0' + (x % 10) as u8;
            x /= 10;
            if x == 0 {
                break;
            }
        }
        (d, i)
    };
    put(b"\nmutation test: refused an allocation of ", &mut buf);
    let (d, i) = num(size as u64);
    put(&d[i..], &mut buf);
    put(b" bytes in the case with seed ", &mut buf);
    let (d, i) = num(seed);
    put(&d[i..], &mut buf);
    put(b"\n", &mut buf);
    // SAFETY: writing a stack buffer to stderr; no allocation.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, n);
    }
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > HARD_CAP {
            refuse(l.size());
            return std::ptr::null_mut();
        }
        note(l.size() as i64);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > HARD_CAP {
            refuse(l.size());
            return std::ptr::null_mut();
        }
        note(l.size() as i64);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as i64));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > HARD_CAP {
            refuse(new);
            return std::ptr::null_mut();
        }
        note(new as i64 - l.size() as i64);
        System.realloc(p, l, new)
    }
}

/// Bytes allocated above the level at the start of the case, at most, on this thread.
pub fn peak_reset() -> i64 {
    let live = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(live));
    live
}

pub fn peak_since(base: i64) -> i64 {
    PEAK.with(|p| p.get()) - base
}
