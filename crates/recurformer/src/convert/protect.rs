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
use crate::model::plan::{HarmRanking, Plan, PlanShape, ProtectRule, ProtectedGroup, Protection};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;

/// The default rules, [`DEFAULT_PROTECT`].
pub fn default_rules() -> Vec<ProtectRule> {
    parse_rules(DEFAULT_PROTECT).expect("the default protection rules parse")
}

/// `--protect`'s default, as parsed by [`parse_rules`]. Chosen by measuring the probes on
/// SmolLM2-135M-Instruct (`recurformer analyze` defaults: 8 x 4 copies of 50 random tokens, 8
/// passkey prompts of 512 tokens, which the model itself answers 8 of 8; 90 KV groups). Every
/// probe is heavy-tailed: most groups score near 0 and a few stand apart, so each threshold sits
/// in the gap below the few:
///
/// - induction >= 0.3: 8 groups (L17-L24; median 0.008, 90th percentile 0.28; RazorAttention,
///   arXiv:2407.15891, keeps ~14 % of heads by this score, which would be 13 groups here);
/// - echo >= 0.5: 3 groups (0.73, 0.66, 0.58), then a gap to 0.29 (RazorAttention also keeps
///   the few echo heads);
/// - previous_token >= 0.5: 8 groups (0.90 .. 0.55), then a gap to 0.39. These are the first half
///   of an induction circuit and the groups the recency rule likes most: the recency-only 50 %
///   plan takes 7 of the 8 (its 45 groups average 0.22 on this probe against 0.13 over all 90);
/// - copy_top1 >= 0.3: 5 groups, 4 of them induction groups too (the retrieval heads of Wu et al.
///   2024, arXiv:2404.15574; they call a head a retrieval head at a score of 0.1, which takes 12
///   groups here, most of them only weakly).
///
/// Together 20 groups; at --replace-fraction 0.5 with one attention group per layer the budget of
/// 45 is still met. The recency-only plan replaces none of the induction, echo or copy groups
/// (the top 13 by induction include 2 of its groups, both below 0.3), so on this model the
/// protection changes the plan through the previous-token groups only. A mixer that reproduces a
/// fixed lag exactly (e.g. through its causal conv) would make that rule unnecessary:
/// `--protect induction:0.3,echo:0.5,copy_top1:0.3` drops it.
pub const DEFAULT_PROTECT: &str = "induction:0.3,echo:0.5,previous_token:0.5,copy_top1:0.3";

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

/// The plan that replaces `fraction` of the groups, filling the budget with the groups of `harm`'s
/// measured entries (the most recency-aware candidates) least harmful to the answer first, the
/// protection `rules` still applying; groups without a measurement come last, in layer order.
/// The ranking is recorded in plan.json (`rule.harm`).
pub fn plan_by_harm(
    report: &RecencyReport,
    fraction: f64,
    min_keep: usize,
    rules: &[ProtectRule],
    harm: HarmRanking,
) -> Result<Plan> {
    let measured: std::collections::HashMap<(usize, usize), f64> = harm
        .groups
        .iter()
        .map(|e| ((e.layer, e.group), e.harm.answer))
        .collect();
    // The selection walks scores in [0, 1], highest first: the least harmful measured group
    // scores 1, the next ones less, every unmeasured group 0 (ties in harm: lower layer, then
    // lower group first, as the recency rule breaks them).
    let mut order: Vec<((usize, usize), f64)> = measured.iter().map(|(&k, &v)| (k, v)).collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let n = order.len() as f64;
    let score: std::collections::HashMap<(usize, usize), f64> = order
        .iter()
        .enumerate()
        .map(|(i, &(k, _))| (k, 1.0 - i as f64 / n))
        .collect();
    let mut ranked = report.clone();
    for layer in &mut ranked.layers {
        for g in &mut layer.groups {
            g.mean_recency = score.get(&(layer.layer, g.group)).copied().unwrap_or(0.0);
        }
    }
    let mut plan = plan_protecting(&ranked, Budget::Fraction(fraction), min_keep, rules)?;
    let unmeasured = plan
        .layers
        .iter()
        .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
        .filter(|lg| !measured.contains_key(lg))
        .count();
    if unmeasured > 0 {
        bail!(
            "the harm ranking measured {} groups, too few for a {fraction} plan: {unmeasured} \
             replaced groups would be unmeasured (raise the candidates)",
            measured.len()
        );
    }
    plan.rule.harm = Some(harm);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::probes::{
        GroupProbes, HeadProbes, LayerProbes, ProbeReport, ProbeScores, RepeatSettings,
    };

    /// An MHA report (one head per group) with the given recency and induction scores per layer.
    fn report(recency: &[&[f64]], induction: &[&[f64]]) -> RecencyReport {
        let v: Vec<Vec<f64>> = recency.iter().map(|r| r.to_vec()).collect();
        let base = crate::convert::select::tests::report(&v, v[0].len(), 8);
        let scores = |x: f64| ProbeScores {
            induction: Some(x),
            echo: Some(0.0),
            previous_token: Some(0.0),
            ..Default::default()
        };
        let probe_layers = induction
            .iter()
            .enumerate()
            .map(|(l, xs)| LayerProbes {
                layer: l,
                heads: xs
                    .iter()
                    .enumerate()
                    .map(|(h, &x)| HeadProbes {
                        head: h,
                        scores: scores(x),
                    })
                    .collect(),
                groups: xs
                    .iter()
                    .enumerate()
                    .map(|(g, &x)| GroupProbes {
                        group: g,
                        heads: vec![g],
                        scores: scores(x),
                    })
                    .collect(),
            })
            .collect();
        RecencyReport {
            probes: Some(ProbeReport {
                repeat: Some(RepeatSettings {
                    sequences: 1,
                    span_len: 3,
                    repeats: 2,
                    seed: 0,
                    token_range: [0, 10],
                }),
                copy: None,
                layers: probe_layers,
            }),
            ..base
        }
    }

    fn sets(p: &Plan) -> Vec<Vec<usize>> {
        p.layers.iter().map(|l| l.mamba_groups.clone()).collect()
    }

    #[test]
    fn rules_parse_and_reject_nonsense() {
        assert!(parse_rules("none").unwrap().is_empty());
        assert_eq!(parse_rules("default").unwrap(), default_rules());
        let r = parse_rules("induction:0.25, copy_mass:top3").unwrap();
        assert_eq!(
            r,
            vec![
                ProtectRule {
                    probe: "induction".into(),
                    min_score: Some(0.25),
                    top_k: None
                },
                ProtectRule {
                    probe: "copy_mass".into(),
                    min_score: None,
                    top_k: Some(3)
                }
            ]
        );
        for bad in [
            "induction",
            "recency:0.5",
            "echo:1.5",
            "echo:topx",
            "echo:abc",
        ] {
            assert!(parse_rules(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protected_groups_are_never_replaced_and_the_budget_moves_on() {
        // Recency ranking: L0G2 .9, L0G1 .8, L1G0 .7, L1G2 .6, L0G0 .5, L1G1 .1.
        let r = report(
            &[&[0.5, 0.8, 0.9], &[0.7, 0.1, 0.6]],
            &[&[0.0, 0.6, 0.1], &[0.2, 0.0, 0.4]],
        );
        let rules = parse_rules("induction:0.4").unwrap();
        assert_eq!(
            sets(&Plan::by_fraction(&r, 0.5, 0).unwrap()),
            vec![vec![1, 2], vec![0]]
        );
        let p = plan_protecting(&r, Budget::Fraction(0.5), 0, &rules).unwrap();
        // L0G1 (0.6) and L1G2 (0.4) protected: the three replaced are L0G2, L1G0, L0G0.
        assert_eq!(sets(&p), vec![vec![0, 2], vec![0]]);
        let prot = p.rule.protection.as_ref().unwrap();
        assert_eq!(
            prot.protected
                .iter()
                .map(|g| (g.layer, g.group))
                .collect::<Vec<_>>(),
            vec![(0, 1), (1, 2)]
        );
        assert_eq!(prot.kept_from_recency, vec![(0, 1)]);
        // Threshold rule: R >= 0.55 would be L0G1, L0G2, L1G0, L1G2; protection keeps two.
        let p = plan_protecting(&r, Budget::Threshold(0.55), 0, &rules).unwrap();
        assert_eq!(sets(&p), vec![vec![2], vec![0]]);
        // Top-k: the best 1 group by induction (L0G1).
        let top = parse_rules("induction:top1").unwrap();
        let p = plan_protecting(&r, Budget::Fraction(0.5), 0, &top).unwrap();
        assert_eq!(sets(&p), vec![vec![2], vec![0, 2]]);
        // Not enough unprotected groups: 5 of 6 asked for, 4 unprotected, 4 replaced.
        let p = plan_protecting(&r, Budget::Fraction(5.0 / 6.0), 0, &rules).unwrap();
        assert_eq!(p.replaced_groups(), 4);
        assert_eq!(sets(&p), vec![vec![0, 2], vec![0, 1]]);
    }

    #[test]
    fn no_rules_is_the_recency_only_plan_and_missing_probes_are_an_error() {
        let mut r = report(
            &[&[0.5, 0.8, 0.9], &[0.7, 0.1, 0.6]],
            &[&[0.9; 3], &[0.9; 3]],
        );
        let p = plan_protecting(&r, Budget::Fraction(0.5), 1, &[]).unwrap();
        assert_eq!(p, Plan::by_fraction(&r, 0.5, 1).unwrap());
        assert!(p.rule.protection.is_none());
        let e = plan_protecting(
            &r,
            Budget::Fraction(0.5),
            0,
            &parse_rules("copy_top1:0.1").unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("copy_top1"), "{e}");
        r.probes = None;
        let e = plan_protecting(&r, Budget::Fraction(0.5), 0, &default_rules())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no probe scores"), "{e}");
    }

    #[test]
    fn a_plan_that_replaces_a_protected_group_does_not_validate() {
        let r = report(&[&[0.5, 0.8, 0.9]], &[&[0.0, 0.6, 0.1]]);
        let mut p = plan_protecting(
            &r,
            Budget::Fraction(1.0 / 3.0),
            0,
            &parse_rules("induction:0.5").unwrap(),
        )
        .unwrap();
        assert_eq!(sets(&p), vec![vec![2]]);
        p.rule.protection.as_mut().unwrap().protected[0].group = 2;
        let e = p.validate_shape(1, 3, 3).unwrap_err().to_string();
        assert!(e.contains("protects layer 0 group 2"), "{e}");
    }

    fn harm_ranking(entries: &[(usize, usize, f64)]) -> HarmRanking {
        use crate::model::plan::{GroupHarm, GroupHarmEntry};
        HarmRanking {
            prompts: 1,
            prompt_len: 16,
            depth: [0.0, 1.0],
            family: Default::default(),
            seed: 0,
            sinks: 4,
            window: 32,
            merged_from: Vec::new(),
            candidates: entries.len(),
            unprotected_only: false,
            groups: entries
                .iter()
                .map(|&(layer, group, answer)| GroupHarmEntry {
                    layer,
                    group,
                    harm: GroupHarm { answer, prose: 0.0 },
                })
                .collect(),
        }
    }

    fn replaced(p: &Plan) -> Vec<(usize, usize)> {
        p.layers
            .iter()
            .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
            .collect()
    }

    #[test]
    fn harm_ranking_replaces_the_least_harmful_candidates() {
        // Recency would take L0G0, L1G0 (0.9, 0.8); harm says those two hurt most.
        let r = report(
            &[&[0.9, 0.7, 0.1], &[0.8, 0.6, 0.2]],
            &[&[0.0; 3], &[0.0; 3]],
        );
        let by_recency = plan_protecting(&r, Budget::Fraction(2.0 / 6.0), 1, &[]).unwrap();
        assert_eq!(replaced(&by_recency), vec![(0, 0), (1, 0)]);
        let h = harm_ranking(&[(0, 0, 5.0), (0, 1, 0.1), (1, 0, 4.0), (1, 1, 0.2)]);
        let p = plan_by_harm(&r, 2.0 / 6.0, 1, &[], h.clone()).unwrap();
        assert_eq!(replaced(&p), vec![(0, 1), (1, 1)]);
        assert_eq!(p.rule.harm.as_ref(), Some(&h));
        // Protection still applies: protecting L0G1 (induction) hands the budget to the next
        // least harmful candidate, L1G0.
        let r2 = report(
            &[&[0.9, 0.7, 0.1], &[0.8, 0.6, 0.2]],
            &[&[0.0, 0.9, 0.0], &[0.0; 3]],
        );
        let rules = parse_rules("induction:0.5").unwrap();
        let p2 = plan_by_harm(&r2, 2.0 / 6.0, 1, &rules, h).unwrap();
        assert_eq!(replaced(&p2), vec![(1, 0), (1, 1)]);
        // Too few measured groups for the budget is an error that names the numbers.
        let few = harm_ranking(&[(0, 1, 0.1)]);
        let e = plan_by_harm(&r, 2.0 / 6.0, 1, &[], few)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("measured 1 groups") && e.contains("1 replaced groups would be unmeasured"),
            "{e}"
        );
    }
}
