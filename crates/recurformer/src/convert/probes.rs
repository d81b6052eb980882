//! Head probes of the retrieval role (DESIGN.md, "Retrieval-aware selection"): which heads take part
//! in copying, so that `plan` can keep their KV groups as attention.
//!
//! The recency score cannot tell a harmless local head from half of a copy circuit: a
//! previous-token head (all mass on t-1) scores near 1.0 on recency, yet it feeds the induction
//! heads that find an earlier occurrence of the current token and copy what followed
//! (Olsson et al. 2022, "In-context Learning and Induction Heads", arXiv:2209.11895). So every query
//! head is also measured by
//!
//! - on a span of L random tokens repeated R times (RazorAttention, arXiv:2407.15891, sec. 3.2;
//!   Olsson et al.), averaged over the query positions of the repeats after the first
//!   (q = r*L + i, r >= 1):
//!   - induction  = sum over r' < r of A[q, r'*L + i + 1] (the position just after an earlier
//!     occurrence of the current token),
//!   - echo       = sum over r' < r of A[q, r'*L + i]     (the earlier occurrences themselves),
//!   - previous_token = A[q, q - 1];
//! - on teacher-forced passkey prompts (`convert::passkey`): at the query position that predicts
//!   answer token j, the attention on the haystack position holding that token (the retrieval-head
//!   score of Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality",
//!   arXiv:2404.15574, sec. 2): `copy_top1` is the fraction of answer tokens whose argmax key is
//!   that position, `copy_mass` the mean attention mass on it. Wu et al. count a copy only when the
//!   model's own generated token matches; teacher forcing scores every answer token instead (the
//!   model's own accuracy on the prompts is recorded beside the scores).
//!
//! Tokens of a span are distinct, so "an earlier occurrence" is exact. A KV group's score is the
//! max over its query heads: a group is replaced whole, so one retrieval head is enough to keep it.
//! As in `analyze`, statistics accumulate per layer as the eager forward produces each layer's
//! probabilities, so memory stays bounded by one layer's (heads x T x T) matrix.

use crate::model::llama::Model;
use crate::model::options::{AttentionImpl, AttnObservation, ForwardOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// The probes, in the order they are stored and drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    Induction,
    Echo,
    PreviousToken,
    CopyTop1,
    CopyMass,
}

impl Probe {
    pub const ALL: [Probe; 5] = [
        Probe::Induction,
        Probe::Echo,
        Probe::PreviousToken,
        Probe::CopyTop1,
        Probe::CopyMass,
    ];

    /// The name used in recency.json, plan.json, file names and flags.
    pub fn name(self) -> &'static str {
        match self {
            Probe::Induction => "induction",
            Probe::Echo => "echo",
            Probe::PreviousToken => "previous_token",
            Probe::CopyTop1 => "copy_top1",
            Probe::CopyMass => "copy_mass",
        }
    }

    /// One line saying what the score is (figure titles).
    pub fn describe(self) -> &'static str {
        match self {
            Probe::Induction => "induction score: mass just after earlier occurrences",
            Probe::Echo => "echo score: mass on earlier occurrences of the token",
            Probe::PreviousToken => "previous-token score: mass on t-1",
            Probe::CopyTop1 => "copy score (top-1): argmax on the copied passkey digit",
            Probe::CopyMass => "copy score (mass): attention on the copied passkey digit",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Probe::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| {
                format!(
                    "unknown probe {s:?}: expected one of {}",
                    Probe::ALL.map(Probe::name).join(", ")
                )
            })
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One head's (or group's) probe scores; a probe that did not run is absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeScores {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub induction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_mass: Option<f64>,
}

impl ProbeScores {
    pub fn get(&self, p: Probe) -> Option<f64> {
        match p {
            Probe::Induction => self.induction,
            Probe::Echo => self.echo,
            Probe::PreviousToken => self.previous_token,
            Probe::CopyTop1 => self.copy_top1,
            Probe::CopyMass => self.copy_mass,
        }
    }

    fn slot(&mut self, p: Probe) -> &mut Option<f64> {
        match p {
            Probe::Induction => &mut self.induction,
            Probe::Echo => &mut self.echo,
            Probe::PreviousToken => &mut self.previous_token,
            Probe::CopyTop1 => &mut self.copy_top1,
            Probe::CopyMass => &mut self.copy_mass,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadProbes {
    pub head: usize,
    #[serde(flatten)]
    pub scores: ProbeScores,
}

/// A KV group's scores: per probe, the max over its query heads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupProbes {
    pub group: usize,
    pub heads: Vec<usize>,
    #[serde(flatten)]
    pub scores: ProbeScores,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerProbes {
    pub layer: usize,
    pub heads: Vec<HeadProbes>,
    pub groups: Vec<GroupProbes>,
}

/// How the repeated-random-token probe was run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RepeatSettings {
    pub sequences: usize,
    /// Tokens per span (L); the span's tokens are distinct.
    pub span_len: usize,
    /// Copies of the span per sequence (R); scores average over copies 2..R.
    pub repeats: usize,
    pub seed: u64,
    /// Token ids are drawn from [lo, hi): the middle of the vocabulary, away from the special and
    /// byte tokens at its start and the rarest merges at its end.
    pub token_range: [u32; 2],
}

/// How the passkey copy probe was run, and how well the model itself copied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopySettings {
    pub prompts: usize,
    /// Prompt tokens before the answer.
    pub prompt_len: usize,
    pub key_digits: usize,
    pub seed: u64,
    /// The haystack text files.
    pub haystack: Vec<String>,
    /// The needle sentence, `{key}` standing for the key.
    pub needle: String,
    /// Answer tokens scored in all.
    pub answer_tokens: usize,
    /// Fraction of answer tokens that are the model's argmax (teacher forced).
    pub model_token_accuracy: f64,
    /// Prompts whose every answer token is the model's argmax.
    pub model_exact: usize,
}

/// The `probes` section of recency.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<RepeatSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopySettings>,
    pub layers: Vec<LayerProbes>,
}

impl ProbeReport {
    /// The probes this report holds.
    pub fn probes(&self) -> Vec<Probe> {
        let mut out = Vec::new();
        if self.repeat.is_some() {
            out.extend([Probe::Induction, Probe::Echo, Probe::PreviousToken]);
        }
        if self.copy.is_some() {
            out.extend([Probe::CopyTop1, Probe::CopyMass]);
        }
        out
    }

    /// Checks counts, ranges and that every probe the settings announce is present.
    pub fn validate(&self, num_layers: usize, nh: usize, n_kv: usize) -> Result<()> {
        if self.layers.len() != num_layers {
            bail!(
                "probe section has {} layers, the report {num_layers}",
                self.layers.len()
            );
        }
        let probes = self.probes();
        for (i, l) in self.layers.iter().enumerate() {
            if l.layer != i || l.heads.len() != nh || l.groups.len() != n_kv {
                bail!(
                    "probe section entry {i}: layer {} with {} heads and {} groups, expected \
                     layer {i} with {nh} and {n_kv}",
                    l.layer,
                    l.heads.len(),
                    l.groups.len()
                );
            }
            let cells = l
                .heads
                .iter()
                .map(|h| ("head", h.head, &h.scores))
                .chain(l.groups.iter().map(|g| ("group", g.group, &g.scores)));
            for (kind, idx, s) in cells {
                for &p in &probes {
                    match s.get(p) {
                        Some(v) if (0.0..=1.0 + 1e-6).contains(&v) => {}
                        Some(v) => bail!(
                            "probe section layer {i} {kind} {idx}: {} {v} is outside [0, 1]",
                            p.name()
                        ),
                        None => bail!(
                            "probe section layer {i} {kind} {idx}: {} is missing",
                            p.name()
                        ),
                    }
                }
            }
        }
        Ok(())
    }

    /// Group scores of `probe` in layer-major order: (layer, group, score).
    pub fn group_scores(&self, probe: Probe) -> Vec<(usize, usize, f64)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.groups
                    .iter()
                    .filter_map(move |g| g.scores.get(probe).map(|s| (l.layer, g.group, s)))
            })
            .collect()
    }
}

/// Running sums of one layer's probe masses, per query head.
#[derive(Debug, Clone)]
pub struct ProbeAccumulator {
    sums: Vec<[f64; 5]>,
    counts: Vec<[u64; 5]>,
}

/// Reads probabilities (b, nh, t, s) into a flat f32 vector after checking the head count.
fn probs_vec(probs: &Tensor, nh_expected: usize) -> Result<(Vec<f32>, [usize; 4])> {
    let (b, nh, t, s) = probs.dims4()?;
    if nh != nh_expected {
        bail!("probabilities for {nh} heads, accumulator has {nh_expected}");
    }
    let p = probs
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((p, [b, nh, t, s]))
}

impl ProbeAccumulator {
    pub fn new(n_heads: usize) -> Self {
        ProbeAccumulator {
            sums: vec![[0.0; 5]; n_heads],
            counts: vec![[0; 5]; n_heads],
        }
    }

    fn add(&mut self, h: usize, p: Probe, v: f64) {
        self.sums[h][p.index()] += v;
        self.counts[h][p.index()] += 1;
    }

    /// Adds the probabilities (b, nh, t, t) of a full forward over sequences that are one span of
    /// `span_len` distinct tokens repeated (t a multiple of `span_len`, at least two copies).
    pub fn add_repeat(&mut self, probs: &Tensor, span_len: usize) -> Result<()> {
        let (p, [b, nh, t, s]) = probs_vec(probs, self.sums.len())?;
        if t != s {
            bail!("the repeat probe needs a full forward from position 0 (got {t} queries over {s} keys)");
        }
        if span_len < 3 || t % span_len != 0 || t < 2 * span_len {
            bail!("{t} positions are not two or more copies of a span of {span_len} >= 3 tokens");
        }
        for bi in 0..b {
            for h in 0..nh {
                for q in span_len..t {
                    let row = &p[((bi * nh + h) * t + q) * s..((bi * nh + h) * t + q + 1) * s];
                    let (r, i) = (q / span_len, q % span_len);
                    let earlier = (0..r).map(|r2| r2 * span_len + i);
                    let echo: f64 = earlier.clone().map(|j| row[j] as f64).sum();
                    let induction: f64 = earlier.map(|j| row[j + 1] as f64).sum();
                    self.add(h, Probe::Induction, induction);
                    self.add(h, Probe::Echo, echo);
                    self.add(h, Probe::PreviousToken, row[q - 1] as f64);
                }
            }
        }
        Ok(())
    }

    /// Adds the probabilities (b, nh, t, s) of queries at positions s-t..s for copy events:
    /// `(query, source)` pairs in absolute positions, where `query` is the position whose next
    /// token is the copy of the token at `source` (source < query).
    pub fn add_copy(&mut self, probs: &Tensor, events: &[(usize, usize)]) -> Result<()> {
        let (p, [b, nh, t, s]) = probs_vec(probs, self.sums.len())?;
        let offset = s - t;
        for &(q, src) in events {
            if q < offset || q >= s || src >= q {
                bail!("copy event (query {q}, source {src}) is outside the {t} queries at {offset}..{s} or not causal");
            }
            let i = q - offset;
            for bi in 0..b {
                for h in 0..nh {
                    let row = &p[((bi * nh + h) * t + i) * s..((bi * nh + h) * t + i) * s + q + 1];
                    // First maximum wins, so a tie with an earlier key is not counted as a hit.
                    let argmax = row
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |m, (j, &x)| if x > m.1 { (j, x) } else { m },
                        )
                        .0;
                    self.add(h, Probe::CopyTop1, (argmax == src) as u8 as f64);
                    self.add(h, Probe::CopyMass, row[src] as f64);
                }
            }
        }
        Ok(())
    }

    /// Means per head and the max over each group's heads (head h reads group h / group_size); a
    /// probe with no counted position is absent.
    pub fn finish(&self, layer: usize, group_size: usize) -> LayerProbes {
        let heads: Vec<HeadProbes> = (0..self.sums.len())
            .map(|h| {
                let mut scores = ProbeScores::default();
                for p in Probe::ALL {
                    let n = self.counts[h][p.index()];
                    if n > 0 {
                        *scores.slot(p) = Some(self.sums[h][p.index()] / n as f64);
                    }
                }
                HeadProbes { head: h, scores }
            })
            .collect();
        let groups = heads
            .chunks(group_size.max(1))
            .enumerate()
            .map(|(g, hs)| {
                let mut scores = ProbeScores::default();
                for p in Probe::ALL {
                    *scores.slot(p) = hs
                        .iter()
                        .filter_map(|h| h.scores.get(p))
                        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
                }
                GroupProbes {
                    group: g,
                    heads: hs.iter().map(|h| h.head).collect(),
                    scores,
                }
            })
            .collect();
        LayerProbes {
            layer,
            heads,
            groups,
        }
    }
}

/// The repeated-random-token inputs: settings and the sequences they make.
#[derive(Debug, Clone)]
pub struct RepeatSet {
    pub settings: RepeatSettings,
    pub sequences: Vec<Vec<u32>>,
}

impl RepeatSet {
    /// `sequences` sequences, each a span of `span_len` distinct token ids drawn (seeded) from
    /// [vocab/4, vocab/2) repeated `repeats` times. No BOS: the first token is the sink, as in
    /// any BOS-less text.
    pub fn generate(
        vocab: usize,
        sequences: usize,
        span_len: usize,
        repeats: usize,
        seed: u64,
    ) -> Result<Self> {
        let (lo, hi) = (vocab / 4, vocab / 2);
        if sequences == 0 || repeats < 2 || span_len < 3 || span_len > hi - lo {
            bail!(
                "repeat probe: need >= 1 sequence, >= 2 repeats and 3 <= span length <= {} \
                 (the token range [{lo}, {hi}) of a {vocab}-token vocabulary); got {sequences} \
                 sequences, {repeats} repeats, span {span_len}",
                hi - lo
            );
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pool: Vec<u32> = (lo as u32..hi as u32).collect();
        let count = sequences;
        let sequences = (0..count)
            .map(|_| {
                let span: Vec<u32> = pool.choose_multiple(&mut rng, span_len).copied().collect();
                span.repeat(repeats)
            })
            .collect();
        Ok(RepeatSet {
            settings: RepeatSettings {
                sequences: count,
                span_len,
                repeats,
                seed,
                token_range: [lo as u32, hi as u32],
            },
            sequences,
        })
    }
}

/// One teacher-forced copy prompt: `ids` holds the prompt and then the answer; answer token j sits
/// at `answer_start + j` and copies the token at `sources[j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyCase {
    pub ids: Vec<u32>,
    pub answer_start: usize,
    pub sources: Vec<usize>,
}

impl CopyCase {
    /// (query, source) pairs: the position predicting answer token j is answer_start + j - 1.
    pub fn events(&self) -> Vec<(usize, usize)> {
        self.sources
            .iter()
            .enumerate()
            .map(|(j, &src)| (self.answer_start + j - 1, src))
            .collect()
    }

    fn check(&self) -> Result<()> {
        let k = self.sources.len();
        if k == 0 || self.answer_start == 0 || self.answer_start + k != self.ids.len() {
            bail!(
                "copy case: {} answer tokens at {} do not end the {} ids",
                k,
                self.answer_start,
                self.ids.len()
            );
        }
        for (j, &src) in self.sources.iter().enumerate() {
            if src + 1 >= self.answer_start || self.ids[src] != self.ids[self.answer_start + j] {
                bail!(
                    "copy case: answer token {j} (id {}) does not copy position {src} of the prompt",
                    self.ids[self.answer_start + j]
                );
            }
        }
        Ok(())
    }
}

/// The copy probe's inputs; `settings`' model accuracy fields are filled in by [`probe_heads`].
#[derive(Debug, Clone)]
pub struct CopySet {
    pub settings: CopySettings,
    pub cases: Vec<CopyCase>,
}

/// Runs the probes on `model`'s eager attention; `progress` is called after each forward with
/// the number done (repeat sequences first, then copy prompts).
pub fn probe_heads(
    model: &Model,
    repeat: Option<&RepeatSet>,
    copy: Option<&CopySet>,
    progress: &mut dyn FnMut(usize),
) -> Result<ProbeReport> {
    let cfg = &model.cfg;
    if repeat.is_none() && copy.is_none() {
        bail!("no probe to run: give the repeat or the copy inputs");
    }
    let mut accs: Vec<ProbeAccumulator> = (0..cfg.num_hidden_layers)
        .map(|_| ProbeAccumulator::new(cfg.num_attention_heads))
        .collect();
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    let mut done = 0;
    if let Some(rs) = repeat {
        let l = rs.settings.span_len;
        for seq in &rs.sequences {
            let ids = Tensor::new(seq.as_slice(), &model.device)?.unsqueeze(0)?; // (1, t)
            let mut cache = model.new_cache(1, seq.len());
            let mut observer =
                |o: &AttnObservation| -> Result<()> { accs[o.layer].add_repeat(o.probs, l) };
            model.forward_hidden(&ids, &mut cache, &opts, Some(&mut observer))?;
            done += 1;
            progress(done);
        }
    }
    let mut copy_settings = None;
    if let Some(cs) = copy {
        let (mut right, mut total, mut exact) = (0usize, 0usize, 0usize);
        for (n, case) in cs.cases.iter().enumerate() {
            case.check().with_context(|| format!("copy prompt {n}"))?;
            let events = case.events();
            let (q0, k) = (case.answer_start - 1, case.sources.len());
            // The last answer token is never an input: t = answer_start + k - 1, and the k
            // queries at q0.. are the last k positions.
            let input = &case.ids[..case.ids.len() - 1];
            let ids = Tensor::new(input, &model.device)?.unsqueeze(0)?; // (1, t)
            let mut cache = model.new_cache(1, input.len());
            // Only the k query rows at q0.. are needed: (1, nh, k, t).
            let mut observer = |o: &AttnObservation| -> Result<()> {
                accs[o.layer].add_copy(&o.probs.narrow(2, q0, k)?, &events)
            };
            let h = model.forward_hidden(&ids, &mut cache, &opts, Some(&mut observer))?; // (1, t, d)
            let pred: Vec<u32> = model
                .logits(&h.narrow(1, q0, k)?)? // (1, k, v)
                .argmax(2)?
                .squeeze(0)?
                .to_vec1()?;
            let hits = pred
                .iter()
                .zip(&case.ids[case.answer_start..])
                .filter(|(a, b)| a == b)
                .count();
            right += hits;
            total += k;
            exact += (hits == k) as usize;
            done += 1;
            progress(done);
        }
        let mut s = cs.settings.clone();
        s.answer_tokens = total;
        s.model_token_accuracy = right as f64 / total.max(1) as f64;
        s.model_exact = exact;
        copy_settings = Some(s);
    }
    let report = ProbeReport {
        repeat: repeat.map(|r| r.settings.clone()),
        copy: copy_settings,
        layers: accs
            .iter()
            .enumerate()
            .map(|(l, a)| a.finish(l, cfg.group_size()))
            .collect(),
    };
    report.validate(
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One head's (t x t) causal matrix with all mass of row q on `target(q)` (row 0 on 0).
    fn one_hot(t: usize, target: impl Fn(usize) -> usize) -> Tensor {
        let mut v = vec![0f32; t * t];
        for q in 0..t {
            v[q * t + target(q).min(q)] = 1.0;
        }
        Tensor::from_vec(v, (1, 1, t, t), &Device::Cpu).unwrap()
    }

    fn repeat_scores(probs: &Tensor, l: usize) -> ProbeScores {
        let mut acc = ProbeAccumulator::new(1);
        acc.add_repeat(probs, l).unwrap();
        acc.finish(0, 1).heads.remove(0).scores
    }

    #[test]
    fn previous_token_head_scores_one_and_no_induction() {
        let (l, r) = (7, 4);
        let s = repeat_scores(&one_hot(l * r, |q| q.saturating_sub(1)), l);
        assert_eq!(s.previous_token, Some(1.0));
        assert_eq!(s.induction, Some(0.0));
        assert_eq!(s.echo, Some(0.0));
        assert_eq!(s.copy_top1, None);
    }

    #[test]
    fn exact_induction_and_echo_patterns_score_one() {
        let (l, r) = (5, 3);
        // Induction: the position just after the previous copy of the current token.
        let s = repeat_scores(&one_hot(l * r, |q| q - l + 1), l);
        assert_eq!(
            (s.induction, s.echo, s.previous_token),
            (Some(1.0), Some(0.0), Some(0.0))
        );
        // Echo: the previous copy of the current token itself.
        let s = repeat_scores(&one_hot(l * r, |q| q - l), l);
        assert_eq!(
            (s.induction, s.echo, s.previous_token),
            (Some(0.0), Some(1.0), Some(0.0))
        );
        // Split evenly over all earlier copies: still all of the mass is induction mass.
        let t = l * r;
        let mut v = vec![0f32; t * t];
        for q in l..t {
            let n = q / l;
            for r2 in 0..n {
                v[q * t + r2 * l + q % l + 1] = 1.0 / n as f32;
            }
        }
        let s = repeat_scores(&Tensor::from_vec(v, (1, 1, t, t), &Device::Cpu).unwrap(), l);
        assert!((s.induction.unwrap() - 1.0).abs() < 1e-6, "{s:?}");
        // A uniform head: each score is the mean over queries of (targets / (q + 1)).
        let u: Vec<f32> = (0..t)
            .flat_map(|q| (0..t).map(move |j| if j <= q { 1.0 / (q + 1) as f32 } else { 0.0 }))
            .collect();
        let s = repeat_scores(&Tensor::from_vec(u, (1, 1, t, t), &Device::Cpu).unwrap(), l);
        let want: f64 =
            (l..t).map(|q| (q / l) as f64 / (q + 1) as f64).sum::<f64>() / (t - l) as f64;
        assert!(
            (s.echo.unwrap() - want).abs() < 1e-6 && (s.induction.unwrap() - want).abs() < 1e-6
        );
    }

    #[test]
    fn repeat_probe_rejects_bad_layouts() {
        let mut acc = ProbeAccumulator::new(1);
        assert!(acc.add_repeat(&one_hot(10, |q| q), 4).is_err()); // not a multiple
        assert!(acc.add_repeat(&one_hot(4, |q| q), 4).is_err()); // one copy only
        assert!(acc.add_repeat(&one_hot(8, |q| q), 4).is_ok());
    }

    #[test]
    fn copy_scores_count_argmax_and_mass() {
        // Query rows 8 and 9 of a 10-key matrix (offset 8); sources 2 and 3.
        let t = 10;
        let mut v = vec![0f32; 2 * t];
        v[2] = 0.6; // row 8: argmax on 2, mass 0.6
        v[0] = 0.4;
        v[t + 3] = 0.3; // row 9: mass 0.3 on 3, argmax elsewhere
        v[t + 5] = 0.7;
        let p = Tensor::from_vec(v, (1, 1, 2, t), &Device::Cpu).unwrap();
        let mut acc = ProbeAccumulator::new(1);
        acc.add_copy(&p, &[(8, 2), (9, 3)]).unwrap();
        let s = acc.finish(0, 1).heads.remove(0).scores;
        assert_eq!(s.copy_top1, Some(0.5));
        assert!((s.copy_mass.unwrap() - 0.45).abs() < 1e-6);
        assert_eq!(s.induction, None);
        assert!(acc.add_copy(&p, &[(7, 2)]).is_err()); // not among the queries
        assert!(acc.add_copy(&p, &[(9, 9)]).is_err()); // not causal
    }

    #[test]
    fn groups_take_the_max_of_their_heads() {
        let mut acc = ProbeAccumulator::new(4);
        for (h, v) in [0.1, 0.7, 0.4, 0.2].into_iter().enumerate() {
            acc.add(h, Probe::Induction, v);
        }
        let l = acc.finish(3, 2);
        assert_eq!(l.groups[0].scores.induction, Some(0.7));
        assert_eq!(l.groups[1].scores.induction, Some(0.4));
        assert_eq!(l.groups[1].heads, vec![2, 3]);
        assert_eq!(l.groups[0].scores.echo, None);
    }

    #[test]
    fn repeat_sequences_are_seeded_spans_of_distinct_mid_vocabulary_tokens() {
        let a = RepeatSet::generate(1000, 3, 20, 3, 7).unwrap();
        assert_eq!(
            a.sequences,
            RepeatSet::generate(1000, 3, 20, 3, 7).unwrap().sequences
        );
        assert_ne!(
            a.sequences,
            RepeatSet::generate(1000, 3, 20, 3, 8).unwrap().sequences
        );
        assert_eq!(a.settings.token_range, [250, 500]);
        for s in &a.sequences {
            assert_eq!(s.len(), 60);
            assert_eq!(&s[..20], &s[20..40]);
            let mut span = s[..20].to_vec();
            span.sort_unstable();
            span.dedup();
            assert_eq!(span.len(), 20);
            assert!(span.iter().all(|&x| (250..500).contains(&x)));
        }
        assert!(RepeatSet::generate(100, 1, 30, 2, 0).is_err()); // 30 > 25 ids in range
    }

    #[test]
    fn probe_names_round_trip_and_old_scores_load() {
        for p in Probe::ALL {
            assert_eq!(Probe::parse(p.name()).unwrap(), p);
        }
        assert!(Probe::parse("recency").is_err());
        let s: ProbeScores = serde_json::from_str(r#"{"induction": 0.5}"#).unwrap();
        assert_eq!((s.induction, s.copy_mass), (Some(0.5), None));
        let h: HeadProbes = serde_json::from_str(r#"{"head": 2, "echo": 0.25}"#).unwrap();
        assert_eq!((h.head, h.scores.echo), (2, Some(0.25)));
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"head":2,"echo":0.25}"#
        );
    }
}
