//! The engine: one worker thread owns the model's sequences and runs them (DESIGN.md, "Serving").
//!
//! Requests arrive as [`Job`]s over a channel and wait in a bounded queue. A job is admitted
//! when a slot is free (at most `parallel` sequences) and, under a cache budget, when its
//! reservation fits: `prompt + max_tokens` tokens of KV for the kept heads plus the constant
//! recurrent / window state, the exact bytes its cache can reach (`Model::
//! cache_bytes_per_token_and_state`). Each iteration of the loop then
//!
//! 1. drops sequences whose client went away (the receiving end of their events is closed),
//! 2. prefills one chunk of the oldest sequence still reading its prompt (so a long prompt
//!    delays the others by one chunk, not by its whole length),
//! 3. runs one decode step of every sequence past its prompt as a single batched forward
//!    (`Model::forward_step_batch`: the weights are read once for all of them).
//!
//! Prefix reuse (DESIGN.md, "Serving"): at the end of each prompt and of each generation the
//! worker keeps a snapshot of the sequence's cache (`HybridCache::fork`) under its exact tokens,
//! least recently used evicted first within `prefix_cache` bytes. A new request whose prompt
//! extends a snapshot's tokens (the next turn of a chat) starts from a copy of it and prefills
//! only the rest. A recurrent state cannot be rolled back, so only a snapshot taken at exactly
//! a prefix of the prompt is used; otherwise the prompt is prefilled from the start.
//!
//! Tokens become text in the worker (incremental detokenisation, stop sequences held back until
//! they can no longer match), so a stop sequence ends the sequence at the step it appears.

use super::api::Usage;
use super::metrics::Metrics;
use anyhow::Result;
use recurformer::checkpoint::loader::LoadedModel;
use recurformer::formats::tokenizer::Tokenizer;
use recurformer::model::cache::HybridCache;
use recurformer::model::generate::{Sampler, SamplingParams};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens prefilled per engine iteration: about half a second of the default model on
/// two cores, so streams already decoding wait at most that long for a newcomer's prompt.
pub const PREFILL_CHUNK: usize = 256;

/// Why a sequence ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence / end-of-turn token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the worker tells the request handler.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(FinishReason, Usage),
    Failed(String),
}

/// One request as the engine runs it, validated and tokenised by the HTTP layer.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Tokens that end the sequence (EOS, and the end-of-turn token in chat).
    pub end_tokens: Vec<u32>,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// Limits the engine enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub parallel: usize,
    pub queue: usize,
    /// Bytes all admitted sequences' caches may reach together; None: unlimited.
    pub cache_budget: Option<usize>,
    /// Tokens a sequence may hold (prompt + completion).
    pub context: usize,
    pub kv_bytes_per_token: usize,
    pub state_bytes: usize,
    /// Bytes of prefix snapshots kept; 0 turns prefix reuse off.
    pub prefix_cache: usize,
}

impl Limits {
    /// Bytes a sequence of `tokens` tokens can reach: KV of the kept heads plus the constant
    /// recurrent and window state.
    pub fn reservation(&self, tokens: usize) -> usize {
        self.kv_bytes_per_token * tokens + self.state_bytes
    }
}

/// Why a job was not queued.
pub enum SubmitError {
    QueueFull(usize),
    /// The job alone needs more than the whole budget: (needed, budget).
    TooLarge(usize, usize),
    Stopped,
}

/// The handle request handlers submit through; the worker thread owns everything else.
pub struct EngineHandle {
    tx: std::sync::Mutex<Sender<Job>>,
    /// Jobs submitted and not yet admitted to a slot (or dropped).
    queued: Arc<AtomicUsize>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let need = self.limits.reservation(job.prompt.len() + job.max_tokens);
        if let Some(budget) = self.limits.cache_budget {
            if need > budget {
                return Err(SubmitError::TooLarge(need, budget));
            }
        }
        let cap = self.limits.queue;
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < cap).then_some(q + 1)
            })
            .is_err()
        {
            self.metrics.rejected_queue_full.inc();
            return Err(SubmitError::QueueFull(cap));
        }
        self.metrics
            .queue_length
            .set(self.queued.load(Ordering::SeqCst));
        let sent = self.tx.lock().map_err(|_| SubmitError::Stopped)?.send(job);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(())
    }
}

/// Starts the worker thread over `loaded`; it runs until every handle is dropped.
pub fn start(loaded: Arc<LoadedModel>, limits: Limits, metrics: Arc<Metrics>) -> EngineHandle {
    let (tx, rx) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let worker = Worker {
        loaded,
        limits,
        metrics: metrics.clone(),
        queued: queued.clone(),
        waiting: VecDeque::new(),
        active: Vec::new(),
        reserved: 0,
        snapshots: Snapshots::default(),
    };
    std::thread::Builder::new()
        .name("recurformer-engine".into())
        .spawn(move || worker.run(rx))
        .expect("spawning the engine thread");
    EngineHandle {
        tx: std::sync::Mutex::new(tx),
        queued,
        limits,
        metrics,
    }
}

/// A sequence in a slot.
struct Seq {
    job: Job,
    cache: HybridCache,
    sampler: Sampler,
    /// Prompt and generated tokens (the repetition penalty reads them).
    history: Vec<u32>,
    /// Prompt tokens fed to the model so far.
    prefilled: usize,
    /// The last sampled token, not yet fed to the model.
    pending: Option<u32>,
    generated: usize,
    text: TextStream,
    stops: StopFilter,
    reserved: usize,
    first_token_at: Option<Instant>,
    finished: bool,
    /// Finished by an end token, a stop sequence or max_tokens (not cancelled, not failed).
    completed: bool,
}

impl Seq {
    fn send(&self, ev: Event) {
        // A closed channel means the client left; the next iteration drops the sequence.
        let _ = self.job.events.send(ev);
    }

    /// Takes a sampled token: emits its text, and finishes the sequence on an end token, a
    /// stop sequence or `max_tokens`.
    fn accept(&mut self, tok: u32, tokenizer: &Tokenizer, metrics: &Metrics) -> Result<()> {
        let now = Instant::now();
        if self.first_token_at.is_none() {
            self.first_token_at = Some(now);
            metrics.ttft.observe((now - self.job.arrived).as_secs_f64());
        }
        self.generated += 1;
        metrics.generated_tokens.inc();
        self.history.push(tok);
        let mut finish = None;
        if self.job.end_tokens.contains(&tok) {
            finish = Some(FinishReason::Stop);
        } else {
            if let Some(piece) = self.text.step(tok, tokenizer)? {
                let (out, stopped) = self.stops.push(&piece);
                if !out.is_empty() {
                    self.send(Event::Text(out));
                }
                if stopped {
                    finish = Some(FinishReason::Stop);
                }
            }
            if finish.is_none() && self.generated >= self.job.max_tokens {
                finish = Some(FinishReason::Length);
            }
        }
        match finish {
            Some(reason) => {
                let by_stop_sequence =
                    reason == FinishReason::Stop && !self.job.end_tokens.contains(&tok);
                self.finish(reason, !by_stop_sequence, tokenizer, metrics)?
            }
            None => self.pending = Some(tok),
        }
        Ok(())
    }

    /// Ends the sequence; `release` sends the text still held back first.
    fn finish(
        &mut self,
        reason: FinishReason,
        release: bool,
        tok: &Tokenizer,
        metrics: &Metrics,
    ) -> Result<()> {
        if release {
            // Text held back (an unfinished character, a possible stop sequence) belongs to the
            // answer when no stop sequence ended it.
            let rest = self.text.flush(tok)?;
            let (out, _) = self.stops.push(&rest);
            let out = out + &self.stops.flush();
            if !out.is_empty() {
                self.send(Event::Text(out));
            }
        }
        if let Some(first) = self.first_token_at {
            if self.generated > 1 {
                metrics
                    .tpot
                    .observe(first.elapsed().as_secs_f64() / (self.generated - 1) as f64);
            }
        }
        // Counted before the client hears of it, so a client that reads /metrics next sees it.
        metrics.requests_finished.inc();
        self.finished = true;
        self.completed = true;
        self.send(Event::Done(
            reason,
            Usage {
                prompt_tokens: self.job.prompt.len(),
                completion_tokens: self.generated,
            },
        ));
        Ok(())
    }
}

struct Worker {
    loaded: Arc<LoadedModel>,
    limits: Limits,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    waiting: VecDeque<Job>,
    active: Vec<Seq>,
    /// Sum of the active sequences' reservations.
    reserved: usize,
    snapshots: Snapshots,
}

/// Cache snapshots by the exact tokens they hold.
#[derive(Default)]
struct Snapshots {
    entries: Vec<Snapshot>,
    bytes: usize,
    clock: u64,
}

struct Snapshot {
    tokens: Vec<u32>,
    cache: HybridCache,
    bytes: usize,
    last_used: u64,
}

impl Snapshots {
    /// Keeps a copy of `cache`, which holds exactly `tokens`, within `budget` bytes.
    fn insert(&mut self, tokens: &[u32], cache: &HybridCache, budget: usize) -> Result<()> {
        let bytes = cache.bytes().total();
        if budget == 0 || bytes > budget || self.entries.iter().any(|e| e.tokens == tokens) {
            return Ok(());
        }
        while self.bytes + bytes > budget {
            let Some(lru) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
            else {
                break;
            };
            self.bytes -= self.entries.swap_remove(lru).bytes;
        }
        self.clock += 1;
        self.entries.push(Snapshot {
            tokens: tokens.to_vec(),
            cache: cache.fork(tokens.len())?,
            bytes,
            last_used: self.clock,
        });
        self.bytes += bytes;
        Ok(())
    }

    /// A copy of the longest snapshot whose tokens are a proper prefix of `prompt` (at least
    /// one prompt token is left to prefill, for the logits of the first new token), with KV room
    /// for `capacity` tokens.
    fn lookup(&mut self, prompt: &[u32], capacity: usize) -> Option<(usize, HybridCache)> {
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() < prompt.len() && prompt.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        self.clock += 1;
        best.last_used = self.clock;
        let cache = best.cache.fork(capacity).ok()?;
        Some((best.tokens.len(), cache))
    }
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return, // every handle dropped: the server is gone
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.active.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            self.prefill_one();
            self.decode_step();
            self.retire();
        }
    }

    fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics
            .queue_length
            .set(self.queued.load(Ordering::SeqCst));
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        for _ in self.waiting.len()..before {
            self.dequeued();
            self.metrics.requests_cancelled.inc();
        }
        for s in &mut self.active {
            if !s.finished && s.job.events.is_closed() {
                s.finished = true;
                self.metrics.requests_cancelled.inc();
            }
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.limits.parallel {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let tokens = job.prompt.len() + job.max_tokens;
            let need = self.limits.reservation(tokens);
            if let Some(budget) = self.limits.cache_budget {
                // First come, first served: a large job at the head waits for room rather than
                // being overtaken forever by small ones.
                if self.reserved + need > budget {
                    break;
                }
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.dequeued();
            let sampler = match Sampler::new(job.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.events.send(Event::Failed(format!("{e:#}")));
                    continue;
                }
            };
            self.metrics.prompt_tokens.add(job.prompt.len());
            let stops = StopFilter::new(job.stop.clone());
            self.reserved += need;
            let (prefilled, cache) = match self.snapshots.lookup(&job.prompt, tokens) {
                Some((n, cache)) => {
                    self.metrics.prefix_reused_tokens.add(n);
                    (n, cache)
                }
                None => (0, self.loaded.model.new_cache(1, tokens)),
            };
            self.active.push(Seq {
                cache,
                sampler,
                history: job.prompt.clone(),
                prefilled,
                pending: None,
                generated: 0,
                text: TextStream::default(),
                stops,
                reserved: need,
                first_token_at: None,
                finished: false,
                completed: false,
                job,
            });
        }
        self.metrics.active_sequences.set(self.active.len());
        self.metrics.cache_reserved_bytes.set(self.reserved);
    }

    fn fail(seq: &mut Seq, metrics: &Metrics, e: &anyhow::Error) {
        eprintln!("serve: a sequence failed: {e:#}");
        seq.send(Event::Failed(format!("{e:#}")));
        seq.finished = true;
        metrics.requests_failed.inc();
    }

    fn prefill_one(&mut self) {
        let Some(seq) = self
            .active
            .iter_mut()
            .find(|s| !s.finished && s.prefilled < s.job.prompt.len())
        else {
            return;
        };
        let model = &self.loaded.model;
        let Ok(tokenizer) = self.loaded.tokenizer() else {
            return;
        };
        let end = (seq.prefilled + PREFILL_CHUNK).min(seq.job.prompt.len());
        let mut run = || -> Result<Option<Vec<f32>>> {
            let ids = candle_core::Tensor::new(&seq.job.prompt[seq.prefilled..end], &model.device)?
                .unsqueeze(0)?; // (1, chunk)
            let logits = model.forward_last(&ids, &mut seq.cache)?; // (1, v)
            Ok(if end == seq.job.prompt.len() {
                Some(logits.squeeze(0)?.to_vec1::<f32>()?)
            } else {
                None
            })
        };
        match run() {
            Ok(logits) => {
                seq.prefilled = end;
                if logits.is_some() {
                    if let Err(e) =
                        self.snapshots
                            .insert(&seq.job.prompt, &seq.cache, self.limits.prefix_cache)
                    {
                        eprintln!("serve: keeping a prefix snapshot failed: {e:#}");
                    }
                }
                if let Some(l) = logits {
                    let tok = seq.sampler.sample(&l, &seq.history);
                    if let Err(e) = seq.accept(tok, tokenizer, &self.metrics) {
                        Self::fail(seq, &self.metrics, &e);
                    }
                }
            }
            Err(e) => Self::fail(seq, &self.metrics, &e),
        }
    }

    fn decode_step(&mut self) {
        let Ok(tokenizer) = self.loaded.tokenizer() else {
            return;
        };
        let mut rows: Vec<&mut Seq> = self
            .active
            .iter_mut()
            .filter(|s| !s.finished && s.pending.is_some())
            .collect();
        if rows.is_empty() {
            return;
        }
        let tokens: Vec<u32> = rows.iter().map(|s| s.pending.expect("filtered")).collect();
        let model = &self.loaded.model;
        let result = {
            let mut caches: Vec<&mut HybridCache> = rows.iter_mut().map(|s| &mut s.cache).collect();
            model
                .forward_step_batch(&tokens, &mut caches)
                .and_then(|l| Ok(l.to_vec2::<f32>()?))
        };
        self.metrics.decode_steps.inc();
        self.metrics.decode_rows.add(rows.len());
        match result {
            Ok(logits) => {
                for (seq, l) in rows.iter_mut().zip(&logits) {
                    seq.pending = None;
                    let tok = seq.sampler.sample(l, &seq.history);
                    if let Err(e) = seq.accept(tok, tokenizer, &self.metrics) {
                        Self::fail(seq, &self.metrics, &e);
                    }
                }
            }
            Err(e) => {
                for seq in rows {
                    Self::fail(seq, &self.metrics, &e);
                }
            }
        }
    }

    fn retire(&mut self) {
        // A sequence that ran to its end leaves a snapshot of everything fed to the model: the
        // prompt and the answer up to its last token (sampled, not yet fed).
        for s in &self.active {
            if s.completed {
                let fed = &s.history[..s.cache.seq_len.min(s.history.len())];
                if fed.len() == s.cache.seq_len {
                    if let Err(e) = self
                        .snapshots
                        .insert(fed, &s.cache, self.limits.prefix_cache)
                    {
                        eprintln!("serve: keeping a prefix snapshot failed: {e:#}");
                    }
                }
            }
        }
        self.metrics.prefix_cache_bytes.set(self.snapshots.bytes);
        let mut freed = 0;
        self.active.retain(|s| {
            if s.finished {
                freed += s.reserved;
            }
            !s.finished
        });
        self.reserved -= freed;
        let mut bytes = recurformer::model::cache::CacheBytes::default();
        for s in &self.active {
            let b = s.cache.bytes();
            bytes.kv += b.kv;
            bytes.recurrent += b.recurrent;
            bytes.window += b.window;
        }
        self.metrics.set_cache_bytes(bytes);
        self.metrics.active_sequences.set(self.active.len());
        self.metrics.cache_reserved_bytes.set(self.reserved);
    }
}

/// Incremental detokenisation: the text a new token adds, decoded with the token before it as
/// context (a tokenizer may render a token differently at the start of a string), and held
/// back while the bytes so far end inside a character (decoded as U+FFFD).
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding context in `ids`.
    start: usize,
    /// Tokens whose text has been returned.
    done: usize,
    /// Text of `ids[start..done]`.
    context: String,
}

impl TextStream {
    pub fn step(&mut self, tok: u32, t: &Tokenizer) -> Result<Option<String>> {
        self.ids.push(tok);
        let text = t.decode(&self.ids[self.start..], true)?;
        if text.len() <= self.context.len()
            || text.ends_with('\u{FFFD}')
            || !text.starts_with(&self.context)
        {
            return Ok(None);
        }
        let piece = text[self.context.len()..].to_string();
        self.start = self.done;
        self.done = self.ids.len();
        self.context = t.decode(&self.ids[self.start..self.done], true)?;
        Ok(Some(piece))
    }

    /// Whatever the held-back tokens decode to, at the end of a sequence.
    pub fn flush(&mut self, t: &Tokenizer) -> Result<String> {
        if self.done == self.ids.len() {
            return Ok(String::new());
        }
        let text = t.decode(&self.ids[self.start..], true)?;
        self.done = self.ids.len();
        Ok(match text.strip_prefix(&self.context) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        })
    }
}

/// Applies stop sequences to streamed text: text that could still be the start of a stop
/// sequence is held back; when one appears the text before it is released and generation ends
/// (the stop sequence itself is not part of the answer, as in OpenAI's API).
pub struct StopFilter {
    stops: Vec<String>,
    text: String,
    sent: usize,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops,
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds `piece`; returns the text now safe to send and whether a stop sequence appeared.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        // A stop sequence cannot start inside text already sent: that text was released only
        // once no stop sequence could begin in it.
        let unsent = &self.text[self.sent..];
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min()
        {
            let out = unsent[..pos].to_string();
            self.sent = self.text.len();
            return (out, true);
        }
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && unsent.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let safe = self.text.len() - hold;
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        (out, false)
    }

    /// The held-back text, at the end of a sequence that no stop sequence ended.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, stopped) = f.push(p);
            out += &o;
            if stopped {
                return (out, true);
            }
        }
        (out + &f.flush(), false)
    }

    #[test]
    fn stop_sequences_split_across_pieces_are_found_and_cut() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        // A prefix of a stop sequence that does not complete is released at the end.
        assert_eq!(run(&["END"], &["abc EN"]), ("abc EN".into(), false));
        // The earliest of several stop sequences wins.
        assert_eq!(run(&["yz", "x"], &["wxyz"]), ("w".into(), true));
        // Multi-byte characters: holding back never splits one.
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".into(), false));
        assert_eq!(run(&[], &["free ", "text"]), ("free text".into(), false));
    }

    #[test]
    fn held_back_text_is_released_as_soon_as_it_cannot_match() {
        let mut f = StopFilter::new(vec!["STOP".into()]);
        assert_eq!(f.push("go ST"), ("go ".into(), false));
        assert_eq!(f.push("AY"), ("STAY".into(), false));
    }
}
