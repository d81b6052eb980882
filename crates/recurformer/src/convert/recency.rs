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

use crate::convert::probes::ProbeReport;
use anyhow::{bail, Context, Result};
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
    /// Retrieval-role probes per head and group (`convert::probes`); absent in reports written
    /// before them or with the probes turned off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbeReport>,
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
            for (j, h) in l.heads.iter().enumerate() {
                if h.head != j {
                    bail!(
                        "recency report layer {i}: head entry {j} is for head {}",
                        h.head
                    );
                }
                // The distance sets a mixer's decay and the RMS its output scale (convert::init).
                for (name, v) in [("distance", h.distance), ("output_rms", h.output_rms)] {
                    if !(v.is_finite() && v >= 0.0) {
                        bail!(
                            "recency report layer {i} head {j}: {name} {v} is not a finite \
                             non-negative number"
                        );
                    }
                }
                for (name, v) in [("recency", h.recency), ("sink", h.sink)] {
                    if !(0.0..=1.0 + 1e-6).contains(&v) {
                        bail!(
                            "recency report layer {i} head {}: {name} {v} is outside [0, 1]",
                            h.head
                        );
                    }
                }
            }
            let gs = self.num_attention_heads / self.num_key_value_heads;
            for (g, gr) in l.groups.iter().enumerate() {
                if gr.group != g || gr.heads != (g * gs..(g + 1) * gs).collect::<Vec<_>>() {
                    bail!(
                        "recency report layer {i}: group entry {g} is group {} with heads {:?}, \
                         expected group {g} with heads {:?}",
                        gr.group,
                        gr.heads,
                        g * gs..(g + 1) * gs
                    );
                }
                for (name, v) in [
                    ("mean_recency", gr.mean_recency),
                    ("min_recency", gr.min_recency),
                ] {
                    if !(0.0..=1.0 + 1e-6).contains(&v) {
                        bail!("recency report layer {i} group {g}: {name} {v} is outside [0, 1]");
                    }
                }
            }
        }
        if let Some(p) = &self.probes {
            p.validate(
                self.num_layers,
                self.num_attention_heads,
                self.num_key_value_heads,
            )
            .context("recency report")?;
        }
        Ok(())
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = crate::formats::io::read_text(path, crate::formats::io::JSON_FILE_LIMIT)?;
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

/// Spearman rank correlation of two equally long score lists (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() || a.len() < 2 {
        bail!(
            "spearman needs two lists of the same length >= 2 (got {} and {})",
            a.len(),
            b.len()
        );
    }
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].partial_cmp(&x[j]).unwrap_or(std::cmp::Ordering::Equal));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        bail!("spearman is undefined when one list is constant");
    }
    Ok(cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Runs the accumulator over one head's (s x s) causal matrix given as rows.
    fn stats_of(rows: Vec<Vec<f32>>, window: usize) -> HeadStats {
        let s = rows.len();
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        let p = Tensor::from_vec(flat, (1, 1, s, s), &Device::Cpu).unwrap();
        let mut acc = HeadAccumulator::new(1);
        acc.add_probs(&p, window).unwrap();
        acc.finish(0, 1).heads.remove(0)
    }

    fn matrix(s: usize, f: impl Fn(usize, usize) -> f32) -> Vec<Vec<f32>> {
        (0..s)
            .map(|t| (0..s).map(|j| if j <= t { f(t, j) } else { 0.0 }).collect())
            .collect()
    }

    #[test]
    fn closed_form_scores() {
        let (s, w) = (64usize, 8usize);
        // Pure diagonal: all mass on the query itself.
        let d = stats_of(matrix(s, |t, j| (t == j) as u8 as f32), w);
        assert!((d.recency - 1.0).abs() < 1e-9 && d.distance.abs() < 1e-9);
        assert!(d.sink.abs() < 1e-9); // t >= w > 4, so the query is never a sink position
                                      // Pure sink: all mass on position 0.
        let k = stats_of(matrix(s, |_, j| (j == 0) as u8 as f32), w);
        assert!(k.recency.abs() < 1e-9 && (k.sink - 1.0).abs() < 1e-9);
        // distance = mean over t in [w, s) of t.
        let mean_t = (w..s).map(|t| t as f64).sum::<f64>() / (s - w) as f64;
        assert!((k.distance - mean_t).abs() < 1e-6);
        // Uniform: recency = mean of w/(t+1), sink = mean of 4/(t+1), distance = mean of t/2.
        let u = stats_of(matrix(s, |t, _| 1.0 / (t + 1) as f32), w);
        let n = (s - w) as f64;
        let er: f64 = (w..s).map(|t| w as f64 / (t + 1) as f64).sum::<f64>() / n;
        let es: f64 = (w..s).map(|t| 4.0 / (t + 1) as f64).sum::<f64>() / n;
        let ed: f64 = (w..s).map(|t| t as f64 / 2.0).sum::<f64>() / n;
        assert!(
            (u.recency - er).abs() < 1e-5
                && (u.sink - es).abs() < 1e-5
                && (u.distance - ed).abs() < 1e-3
        );
        // Exponential decay with ratio r: normalised weights r^(t-j); the last w keys hold
        // (1 - r^w) / (1 - r^(t+1)) of the mass.
        let r = 0.8f64;
        let e = stats_of(
            matrix(s, |t, j| {
                (r.powi((t - j) as i32) * (1.0 - r) / (1.0 - r.powi(t as i32 + 1))) as f32
            }),
            w,
        );
        let ee: f64 = (w..s)
            .map(|t| (1.0 - r.powi(w as i32)) / (1.0 - r.powi(t as i32 + 1)))
            .sum::<f64>()
            / n;
        assert!((e.recency - ee).abs() < 1e-5, "{} vs {ee}", e.recency);
    }

    #[test]
    fn groups_average_their_heads() {
        let h = |head, recency| HeadStats {
            head,
            recency,
            sink: 0.0,
            distance: 0.0,
            output_rms: 0.0,
        };
        let g = group_stats(&[h(0, 0.2), h(1, 0.4), h(2, 0.9), h(3, 0.7)], 2);
        assert_eq!(g.len(), 2);
        assert!((g[0].mean_recency - 0.3).abs() < 1e-12 && (g[0].min_recency - 0.2).abs() < 1e-12);
        assert_eq!(g[1].heads, vec![2, 3]);
    }

    #[test]
    fn spearman_known_values() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // Classic example: d^2 sum = 2 over n = 4 -> 1 - 6*2/(4*15) = 0.8.
        assert!(
            (spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap() - 0.8).abs() < 1e-12
        );
        assert!(spearman(&[1.0], &[1.0]).is_err());
    }
}
