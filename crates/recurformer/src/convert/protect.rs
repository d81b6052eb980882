//! Plans that protect retrieval (DESIGN.md, "Retrieval-aware selection"): KV groups with strong
//! probe evidence of a retrieval role (`convert::probes`) stay attention, and the recency rule of
//! `convert::select` fills its budget from the remaining groups.
//!
//! A rule names a probe and either a minimum group score (`induction:0.3`) or a top-k over all
//! groups (`copy_mass:top4`); a group is protected when any rule picks it. The fraction rule walks
//! the recency ranking skipping protected groups (as it skips a layer at its minimum), so the
//! requested number is replaced whenever enough unprotected groups remain; otherwise it replaces
//! fewer, and `plan` warns with the numbers (a protected group is never traded for the budget:
//! the point of protection is that losing those heads costs retrieval whatever the cache saves).
//!
//! What protection did is recorded in plan.json (`rule.protection`): the rules, every protected
//! group with the probes that picked it, and the groups the same rule without protection would
//! have replaced. With no rules the plan is the recency-only plan, byte for byte.

use crate::convert::probes::Probe;
use crate::convert::recency::RecencyReport;
use crate::model::plan::{Plan, PlanShape, ProtectRule, ProtectedGroup, Protection};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;

/// The default rules, chosen by measuring the probes on SmolLM2-135M-Instruct (README, "plan"):
/// see [`DEFAULT_PROTECT`] for the numbers behind each threshold.
pub fn default_rules() -> Vec<ProtectRule> {
    parse_rules(DEFAULT_PROTECT).expect("the default protection rules parse")
}

/// `--protect`'s default, as parsed by [`parse_rules`].
///
/// Measured on SmolLM2-135M-Instruct (90 KV groups; `analyze` defaults):
/// TODO(measure) filled in below.
pub const DEFAULT_PROTECT: &str = "induction:0.3,copy_top1:0.3";

/// Parses a comma-separated list of `probe:T` (protect groups scoring >= T) and `probe:topK`
/// (protect the K best groups by that probe). `none` (or an empty string) is no rule, `default`
/// is [`DEFAULT_PROTECT`].
pub fn parse_rules(spec: &str) -> Result<Vec<ProtectRule>> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "none" {
        return Ok(Vec::new());
    }
    if spec == "default" {
        return parse_rules(DEFAULT_PROTECT);
    }
    spec.split(',')
        .map(|item| {
            let item = item.trim();
            let (probe, value) = item.split_once(':').with_context(|| {
                format!("protection rule {item:?}: expected PROBE:THRESHOLD or PROBE:topK")
            })?;
            let probe = Probe::parse(probe.trim())?.name().to_string();
            let value = value.trim();
            if let Some(k) = value.strip_prefix("top") {
                let k: usize = k
                    .parse()
                    .with_context(|| format!("protection rule {item:?}: {k:?} is not a count"))?;
                Ok(ProtectRule {
                    probe,
                    min_score: None,
                    top_k: Some(k),
                })
            } else {
                let t: f64 = value.parse().with_context(|| {
                    format!("protection rule {item:?}: {value:?} is not a score")
                })?;
                if !(0.0..=1.0).contains(&t) {
                    bail!("protection rule {item:?}: threshold {t} is outside [0, 1]");
                }
                Ok(ProtectRule {
                    probe,
                    min_score: Some(t),
                    top_k: None,
                })
            }
        })
        .collect()
}

/// Per layer, per group: the probes whose rules pick the group (empty: not protected). Fails when
/// the report has no probe section or lacks a probe a rule names.
pub fn protected_groups(
    report: &RecencyReport,
    rules: &[ProtectRule],
) -> Result<Vec<Vec<Vec<String>>>> {
    let mut picked = vec![vec![Vec::new(); report.num_key_value_heads]; report.num_layers];
    if rules.is_empty() {
        return Ok(picked);
    }
    let probes = report.probes.as_ref().with_context(|| {
        format!(
            "the recency report of {} has no probe scores (written before the probes, or with \
             them off): rerun `recurformer analyze`, or plan with --protect none",
            report.model
        )
    })?;
    for rule in rules {
        let probe = Probe::parse(&rule.probe)?;
        let mut scores = probes.group_scores(probe);
        if scores.len() != report.num_layers * report.num_key_value_heads {
            bail!(
                "the recency report has no {} scores (probes measured: {}): rerun `recurformer \
                 analyze` with that probe on, or drop the rule",
                probe.name(),
                probes
                    .probes()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // Highest first; ties by (layer, group) ascending, as the fraction rule ranks.
        scores.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        let chosen = scores.iter().enumerate().filter(|(rank, &(_, _, s))| {
            rule.min_score.is_some_and(|t| s >= t) || rule.top_k.is_some_and(|k| *rank < k)
        });
        for (_, &(l, g, _)) in chosen {
            picked[l][g].push(probe.name().to_string());
        }
    }
    Ok(picked)
}

/// How many groups the recency rule replaces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// `Plan::by_threshold`: groups with mean recency >= tau.
    Threshold(f64),
    /// `Plan::by_fraction`: round(F * total groups), highest recency first.
    Fraction(f64),
}

/// The plan of `budget` that keeps every group picked by `rules` as attention (see the module
/// doc). With no rules this is exactly `Plan::by_threshold` / `Plan::by_fraction`.
pub fn plan_protecting(
    report: &RecencyReport,
    budget: Budget,
    min_keep: usize,
    rules: &[ProtectRule],
) -> Result<Plan> {
    let recency_only = match budget {
        Budget::Threshold(tau) => Plan::by_threshold(report, tau, min_keep)?,
        Budget::Fraction(f) => Plan::by_fraction(report, f, min_keep)?,
    };
    if rules.is_empty() {
        return Ok(recency_only);
    }
    let picked = protected_groups(report, rules)?;
    let mask: Vec<Vec<bool>> = picked
        .iter()
        .map(|l| l.iter().map(|p| !p.is_empty()).collect())
        .collect();
    let mut plan = match budget {
        Budget::Threshold(tau) => Plan::by_threshold_excluding(report, tau, min_keep, &mask)?,
        Budget::Fraction(f) => Plan::by_fraction_excluding(report, f, min_keep, &mask)?,
    };
    let protected: Vec<ProtectedGroup> = picked
        .iter()
        .enumerate()
        .flat_map(|(l, groups)| {
            groups
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_empty())
                .map(move |(g, p)| ProtectedGroup {
                    layer: l,
                    group: g,
                    probes: p.clone(),
                })
        })
        .collect();
    let replaced = |p: &Plan| -> BTreeSet<(usize, usize)> {
        p.layers
            .iter()
            .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
            .collect()
    };
    let kept_from_recency = replaced(&recency_only)
        .into_iter()
        .filter(|&(l, g)| mask[l][g])
        .collect();
    plan.rule.protection = Some(Protection {
        rules: rules.to_vec(),
        protected,
        kept_from_recency,
    });
    let shape = PlanShape::from_report(report);
    plan.validate_shape(
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    )?;
    Ok(plan)
}
