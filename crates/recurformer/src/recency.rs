//! Recency analysis (DESIGN.md, "Recency score"): how much of each head's attention falls on the
//! most recent keys.
//!
//! For layer l, query head h, causal attention probabilities A[t, j]:
//!   recency R(l,h) = mean over query positions t >= w of  sum_{j = t-w+1 .. t} A[t, j]
//!   sink           = mean over the same t of  sum_{j < 4} A[t, j]
//!   distance       = mean over the same t of  sum_j A[t, j] * (t - j)
//! A KV group's score is the mean of its query heads' recency (the min is reported too).
//! Positions t < w are skipped: there every key is "recent" and the score would be 1 trivially.
//!
//! Statistics accumulate per layer as the eager forward produces each layer's probabilities, so
//! memory stays bounded by one layer's (heads x T x T) matrix.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Keys counted as attention sinks: the first few positions.
pub const SINK_TOKENS: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadStats {
    pub head: usize,
    /// Attention mass on the `window` most recent keys, in [0, 1].
    pub recency: f64,
    /// Attention mass on the first `SINK_TOKENS` positions, in [0, 1].
    pub sink: f64,
    /// Mean attention distance in tokens.
    pub distance: f64,
    /// RMS of the head's output (before o_proj), the scale a replacing mixer should reproduce.
    pub output_rms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupStats {
    /// KV head index.
    pub group: usize,
    /// Query heads reading this KV head.
    pub heads: Vec<usize>,
    pub mean_recency: f64,
    pub min_recency: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub heads: Vec<HeadStats>,
    pub groups: Vec<GroupStats>,
}

/// What the calibration run was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Calibration {
    pub data: Vec<String>,
    pub sequences: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// The content of `recency.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecencyReport {
    pub model: String,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub window: usize,
    pub sink_tokens: usize,
    pub calibration: Calibration,
    pub layers: Vec<LayerStats>,
}

impl RecencyReport {
    /// Group scores in layer-major order: (layer, group, mean recency).
    pub fn group_scores(&self) -> Vec<(usize, usize, f64)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.groups
                    .iter()
                    .map(move |g| (l.layer, g.group, g.mean_recency))
            })
            .collect()
    }

    /// Checks counts and ranges, naming the layer and head at fault.
    pub fn validate(&self) -> Result<()> {
        if self.layers.len() != self.num_layers {
            bail!(
                "recency report has {} layers, header says {}",
                self.layers.len(),
                self.num_layers
            );
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            bail!(
                "recency report: {} query heads cannot be grouped over {} KV heads",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.layer != i {
                bail!("recency report: entry {i} is for layer {}", l.layer);
            }
            if l.heads.len() != self.num_attention_heads
                || l.groups.len() != self.num_key_value_heads
            {
                bail!(
                    "recency report layer {i}: {} heads and {} groups, expected {} and {}",
                    l.heads.len(),
                    l.groups.len(),
                    self.num_attention_heads,
                    self.num_key_value_heads
                );
            }
            for h in &l.heads {
                for (name, v) in [("recency", h.recency), ("sink", h.sink)] {
                    if !(0.0..=1.0 + 1e-6).contains(&v) {
                        bail!(
                            "recency report layer {i} head {}: {name} {v} is outside [0, 1]",
                            h.head
                        );
                    }
                }
            }
        }
        Ok(())
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r: RecencyReport = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid recency report", path.display()))?;
        r.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(r)
    }
}

/// Running sums for one layer's heads.
#[derive(Debug, Clone)]
pub struct HeadAccumulator {
    pub recency: Vec<f64>,
    pub sink: Vec<f64>,
    pub distance: Vec<f64>,
    /// Query positions counted per head.
    pub count: Vec<u64>,
    pub out_sq: Vec<f64>,
    pub out_count: Vec<u64>,
}

impl HeadAccumulator {
    pub fn new(n_heads: usize) -> Self {
        HeadAccumulator {
            recency: vec![0.0; n_heads],
            sink: vec![0.0; n_heads],
            distance: vec![0.0; n_heads],
            count: vec![0; n_heads],
            out_sq: vec![0.0; n_heads],
            out_count: vec![0; n_heads],
        }
    }

    /// Adds the probabilities `probs` (b, nh, t, s) of queries at positions s-t..s.
    pub fn add_probs(&mut self, probs: &Tensor, window: usize) -> Result<()> {
        let (b, nh, t, s) = probs.dims4()?;
        if nh != self.recency.len() {
            bail!(
                "probabilities for {nh} heads, accumulator has {}",
                self.recency.len()
            );
        }
        let offset = s - t;
        let p = probs
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let pos = offset + i; // absolute position of this query
                    if pos < window {
                        continue;
                    }
                    let row = &p[((bi * nh + h) * t + i) * s..((bi * nh + h) * t + i + 1) * s];
                    let recent: f64 = row[pos + 1 - window..=pos].iter().map(|&x| x as f64).sum();
                    let sink: f64 = row[..SINK_TOKENS.min(pos + 1)]
                        .iter()
                        .map(|&x| x as f64)
                        .sum();
                    let dist: f64 = row[..=pos]
                        .iter()
                        .enumerate()
                        .map(|(j, &x)| x as f64 * (pos - j) as f64)
                        .sum();
                    self.recency[h] += recent;
                    self.sink[h] += sink;
                    self.distance[h] += dist;
                    self.count[h] += 1;
                }
            }
        }
        Ok(())
    }

    /// Adds the heads' outputs (b, nh, t, hd) before o_proj, for their RMS.
    pub fn add_outputs(&mut self, out: &Tensor) -> Result<()> {
        let (b, nh, t, hd) = out.dims4()?;
        let sq = out
            .sqr()?
            .sum_keepdim(3)?
            .sum_keepdim(2)?
            .sum_keepdim(0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for h in 0..nh {
            self.out_sq[h] += sq[h] as f64;
            self.out_count[h] += (b * t * hd) as u64;
        }
        Ok(())
    }

    pub fn finish(&self, layer: usize, group_size: usize) -> LayerStats {
        let nh = self.recency.len();
        let avg = |v: f64, n: u64| if n == 0 { 0.0 } else { v / n as f64 };
        let heads: Vec<HeadStats> = (0..nh)
            .map(|h| HeadStats {
                head: h,
                recency: avg(self.recency[h], self.count[h]),
                sink: avg(self.sink[h], self.count[h]),
                distance: avg(self.distance[h], self.count[h]),
                output_rms: avg(self.out_sq[h], self.out_count[h]).sqrt(),
            })
            .collect();
        let groups = group_stats(&heads, group_size);
        LayerStats {
            layer,
            heads,
            groups,
        }
    }
}

/// Per-KV-group mean and min of the member heads' recency (head h reads group h / group_size).
pub fn group_stats(heads: &[HeadStats], group_size: usize) -> Vec<GroupStats> {
    heads
        .chunks(group_size)
        .enumerate()
        .map(|(g, hs)| GroupStats {
            group: g,
            heads: hs.iter().map(|h| h.head).collect(),
            mean_recency: hs.iter().map(|h| h.recency).sum::<f64>() / hs.len() as f64,
            min_recency: hs.iter().map(|h| h.recency).fold(f64::INFINITY, f64::min),
        })
        .collect()
}
