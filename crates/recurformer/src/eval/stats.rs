//! Statistics of the retrieval scores: a confidence interval for an exact-match rate and a paired
//! test of two models on the same cases, so that "60 %" and "100 %" over a few cases are not read
//! as different when they are not.

use serde::{Deserialize, Serialize};

/// z of a two-sided 95 % normal interval (the 0.975 quantile of the standard normal).
pub const Z95: f64 = 1.959_963_984_540_054;

/// A rate with its Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub successes: usize,
    pub trials: usize,
    /// successes / trials (0 when there are no trials).
    pub rate: f64,
    /// Wilson 95 % score interval.
    pub low: f64,
    pub high: f64,
}

impl Proportion {
    pub fn new(successes: usize, trials: usize) -> Self {
        let (low, high) = wilson_interval(successes, trials, Z95);
        Proportion {
            successes,
            trials,
            rate: if trials == 0 {
                0.0
            } else {
                successes as f64 / trials as f64
            },
            low,
            high,
        }
    }
}

/// Wilson score interval for `k` successes in `n` trials at normal quantile `z` (Wilson 1927,
/// "Probable inference, the law of succession, and statistical inference", JASA 22:209-212; the
/// form of Brown, Cai & DasGupta 2001, "Interval estimation for a binomial proportion", Stat. Sci.
/// 16:101-133, eq. 4):
///
/// `(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`, p = k/n.
///
/// Unlike the Wald interval p ± z sqrt(p(1-p)/n) it does not collapse to a point at 0/n or n/n,
/// and it stays inside [0, 1]. With no trials nothing is known: (0, 1).
pub fn wilson_interval(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (nf, p) = (n as f64, k.min(n) as f64 / n as f64);
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = z / denom * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
    // At p = 0 (p = 1) the lower (upper) end is exactly 0 (1); write it so, without rounding.
    let low = if k == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let high = if k >= n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (low, high)
}

/// The paired comparison of two models on the same cases.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Cases the reference got right and the other model wrong.
    pub reference_only: usize,
    /// Cases the other model got right and the reference wrong.
    pub other_only: usize,
    /// Exact two-sided p-value.
    pub p_value: f64,
}

/// Exact (conditional) McNemar test of paired binary outcomes: of the n = b + c discordant pairs,
/// under the null hypothesis of equal accuracy each is b-type with probability 1/2, so
/// `p = min(1, 2 * P[X <= min(b, c)])` with X ~ Binomial(n, 1/2); p = 1 without discordant pairs.
/// This is the "McNemar exact conditional test" of Fagerland, Lydersen & Laake 2013 ("The McNemar
/// test for binary matched-pairs data: mid-p and asymptotic are better than exact conditional",
/// BMC Med. Res. Methodol. 13:91, eq. 2), and what statsmodels' `mcnemar(table, exact=True)`
/// computes (<https://github.com/statsmodels/statsmodels/blob/v0.14.4/statsmodels/stats/contingency_tables.py#L1280>).
/// The exact test is conservative; it is kept because it needs no large-sample assumption.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum in log space: C(n, i) 2^-n underflows for n beyond about 1,000.
    let ln2 = std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose - n as f64 * ln2);
    }
    let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// McNemar of `other` against `reference`, outcomes paired by index.
pub fn mcnemar(reference: &[bool], other: &[bool]) -> anyhow::Result<McNemar> {
    if reference.len() != other.len() {
        anyhow::bail!(
            "McNemar needs the same cases for both models: {} against {}",
            reference.len(),
            other.len()
        );
    }
    let b = reference
        .iter()
        .zip(other)
        .filter(|(r, o)| **r && !**o)
        .count();
    let c = reference
        .iter()
        .zip(other)
        .filter(|(r, o)| !**r && **o)
        .count();
    Ok(McNemar {
        reference_only: b,
        other_only: c,
        p_value: mcnemar_exact(b, c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-5
    }

    #[test]
    fn wilson_hand_checked() {
        // 8/10: p = 0.8, z² = 3.8415; centre = (0.8 + 0.19207) / 1.38415 = 0.71674;
        // half = 1.95996 / 1.38415 * sqrt(0.016 + 0.0096037) = 0.22659 -> (0.4902, 0.9433).
        let (lo, hi) = wilson_interval(8, 10, Z95);
        assert!(close(lo, 0.49016) && close(hi, 0.94333), "{lo} {hi}");
        // 0/10: centre = 0.19207 / 1.38415 = 0.13876, half the same -> (0, 0.27753).
        let (lo, hi) = wilson_interval(0, 10, Z95);
        assert!(lo == 0.0 && close(hi, 0.27753), "{lo} {hi}");
        // 10/10 mirrors 0/10.
        let (lo, hi) = wilson_interval(10, 10, Z95);
        assert!(close(lo, 0.72247) && hi == 1.0, "{lo} {hi}");
        // 50/100: (0.4038, 0.5962).
        let (lo, hi) = wilson_interval(50, 100, Z95);
        assert!(close(lo, 0.40383) && close(hi, 0.59617), "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
        // More cases, narrower interval around the same rate.
        let p = Proportion::new(80, 100);
        assert!(p.low > 0.49016 && p.high < 0.94333 && p.rate == 0.8);
    }

    #[test]
    fn mcnemar_hand_checked() {
        // b = 1, c = 6: n = 7, P[X <= 1] = (1 + 7) / 128 = 0.0625 -> p = 0.125.
        assert!(close(mcnemar_exact(1, 6), 0.125));
        assert!(close(mcnemar_exact(6, 1), 0.125));
        // b = 0, c = 5: 2 / 32 = 0.0625.
        assert!(close(mcnemar_exact(0, 5), 0.0625));
        // b = 2, c = 10: 2 * (1 + 12 + 66) / 4096 = 0.038574: significant at 5 %.
        assert!(close(mcnemar_exact(2, 10), 0.0385742));
        // Balanced or no discordant pairs: p = 1.
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 0 vs 100 discordant: exactly 2^-99.
        assert!((mcnemar_exact(0, 100) / 2f64.powi(-99) - 1.0).abs() < 1e-9);
        // 1,100 discordant pairs, where 2^-n alone underflows: the normal approximation with
        // continuity correction gives 2 * Phi((540.5 - 550) / 16.58) = 0.567.
        let p = mcnemar_exact(540, 560);
        assert!(p > 0.54 && p < 0.59, "{p}");
        let r = [true, true, false, true, false, true];
        let o = [true, false, false, false, true, true];
        let m = mcnemar(&r, &o).unwrap();
        assert_eq!((m.reference_only, m.other_only), (2, 1));
        assert!(close(m.p_value, 1.0));
        assert!(mcnemar(&r, &o[..5]).is_err());
    }
}
