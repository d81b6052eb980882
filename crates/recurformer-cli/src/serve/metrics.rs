//! Server metrics, rendered in the Prometheus text exposition format (version 0.0.4).

use recurformer::model::cache::CacheBytes;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: usize) {
        self.0.store(v as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket counts (not cumulative), then count and sum.
    state: Mutex<(Vec<u64>, u64, f64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0, 0.0)),
        }
    }

    pub fn observe(&self, x: f64) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
                s.0[i] += 1;
            }
            s.1 += 1;
            s.2 += x;
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let Ok(s) = self.state.lock() else { return };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&s.0) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.1);
        let _ = writeln!(out, "{name}_sum {}", s.2);
        let _ = writeln!(out, "{name}_count {}", s.1);
    }
}

const TTFT_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const TPOT_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];

pub struct Metrics {
    pub requests_received: Counter,
    pub requests_finished: Counter,
    pub requests_cancelled: Counter,
    pub requests_failed: Counter,
    pub requests_invalid: Counter,
    pub rejected_queue_full: Counter,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// Batched decode forwards, and the sequences they stepped (their ratio is the mean batch).
    pub decode_steps: Counter,
    pub prefix_reused_tokens: Counter,
    pub prefix_cache_bytes: Gauge,
    pub decode_rows: Counter,
    pub queue_length: Gauge,
    pub active_sequences: Gauge,
    pub slots: Gauge,
    pub cache_reserved_bytes: Gauge,
    pub cache_budget_bytes: Gauge,
    cache_kv: Gauge,
    cache_recurrent: Gauge,
    cache_window: Gauge,
    pub ttft: Histogram,
    pub tpot: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_received: Counter::default(),
            requests_finished: Counter::default(),
            requests_cancelled: Counter::default(),
            requests_failed: Counter::default(),
            requests_invalid: Counter::default(),
            rejected_queue_full: Counter::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            decode_steps: Counter::default(),
            prefix_reused_tokens: Counter::default(),
            prefix_cache_bytes: Gauge::default(),
            decode_rows: Counter::default(),
            queue_length: Gauge::default(),
            active_sequences: Gauge::default(),
            slots: Gauge::default(),
            cache_reserved_bytes: Gauge::default(),
            cache_budget_bytes: Gauge::default(),
            cache_kv: Gauge::default(),
            cache_recurrent: Gauge::default(),
            cache_window: Gauge::default(),
            ttft: Histogram::new(TTFT_BOUNDS),
            tpot: Histogram::new(TPOT_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn set_cache_bytes(&self, b: CacheBytes) {
        self.cache_kv.set(b.kv);
        self.cache_recurrent.set(b.recurrent);
        self.cache_window.set(b.window);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "recurformer_requests_received_total",
            "counter",
            "Completion requests received.",
            self.requests_received.get(),
        );
        one(
            "recurformer_requests_finished_total",
            "counter",
            "Requests answered to the end.",
            self.requests_finished.get(),
        );
        one(
            "recurformer_requests_cancelled_total",
            "counter",
            "Requests whose client disconnected before the end.",
            self.requests_cancelled.get(),
        );
        one(
            "recurformer_requests_failed_total",
            "counter",
            "Requests that failed inside the engine.",
            self.requests_failed.get(),
        );
        one(
            "recurformer_requests_invalid_total",
            "counter",
            "Requests refused with a 4xx error.",
            self.requests_invalid.get(),
        );
        one(
            "recurformer_requests_rejected_queue_full_total",
            "counter",
            "Requests refused with 503 because the queue was full.",
            self.rejected_queue_full.get(),
        );
        one(
            "recurformer_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            self.prompt_tokens.get(),
        );
        one(
            "recurformer_generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.get(),
        );
        one(
            "recurformer_decode_steps_total",
            "counter",
            "Batched decode forwards.",
            self.decode_steps.get(),
        );
        one(
            "recurformer_decode_sequence_steps_total",
            "counter",
            "Sequences stepped by batched decode forwards (divided by decode steps: the mean batch).",
            self.decode_rows.get(),
        );
        one(
            "recurformer_prefix_reused_tokens_total",
            "counter",
            "Prompt tokens restored from prefix snapshots instead of prefilled.",
            self.prefix_reused_tokens.get(),
        );
        one(
            "recurformer_prefix_cache_bytes",
            "gauge",
            "Bytes held by prefix snapshots.",
            self.prefix_cache_bytes.get(),
        );
        one(
            "recurformer_queue_length",
            "gauge",
            "Requests waiting for a slot.",
            self.queue_length.get(),
        );
        one(
            "recurformer_active_sequences",
            "gauge",
            "Sequences holding a slot and a cache.",
            self.active_sequences.get(),
        );
        one(
            "recurformer_slots",
            "gauge",
            "Sequences that may run at once (--parallel).",
            self.slots.get(),
        );
        one(
            "recurformer_cache_reserved_bytes",
            "gauge",
            "Bytes the active sequences' caches may reach (admission reservations).",
            self.cache_reserved_bytes.get(),
        );
        one(
            "recurformer_cache_budget_bytes",
            "gauge",
            "The --cache-memory budget (0: unlimited).",
            self.cache_budget_bytes.get(),
        );
        let _ = writeln!(
            out,
            "# HELP recurformer_cache_bytes Bytes held by the active sequences' caches, by kind.\n\
             # TYPE recurformer_cache_bytes gauge\n\
             recurformer_cache_bytes{{kind=\"kv\"}} {}\n\
             recurformer_cache_bytes{{kind=\"recurrent\"}} {}\n\
             recurformer_cache_bytes{{kind=\"window\"}} {}",
            self.cache_kv.get(),
            self.cache_recurrent.get(),
            self.cache_window.get()
        );
        self.ttft.render(
            &mut out,
            "recurformer_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
        );
        self.tpot.render(
            &mut out,
            "recurformer_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
        );
        out
    }
}
