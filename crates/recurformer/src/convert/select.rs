//! Choosing a plan from the analysis (DESIGN.md, "Selection is per KV group"): which KV groups of
//! each layer become a Mamba mixer, from a [`RecencyReport`], by one of two rules:
//!
//! - threshold: a group is replaced iff its mean recency score R >= tau;
//! - fraction: the round(F * total_groups) groups with the highest mean recency across all layers
//!   are replaced (see [`Plan::by_fraction`] for the rounding and the tie order).
//!
//! Both keep at least `min_attention_groups_per_layer` attention groups in every layer. The
//! threshold rule hands back a layer's lowest-scoring replaced groups; the fraction rule skips a
//! group whose layer is at its limit and takes the next-ranked one, so it replaces exactly the
//! requested number whenever the per-layer minimum allows.
//!
//! The rules are constructors of [`Plan`] (`Plan::by_threshold`, `Plan::by_fraction`), written here
//! beside the analysis they read; the plan itself, its validation and its byte accounting are
//! `model::plan`. The tests below cover both: plans chosen here, then validated, saved and measured.

use crate::convert::recency::RecencyReport;
use crate::model::plan::{Plan, PlanRule, PlanShape, Selection};
use anyhow::{bail, Context, Result};

impl PlanShape {
    pub fn from_report(report: &RecencyReport) -> Self {
        PlanShape {
            num_layers: report.num_layers,
            num_attention_heads: report.num_attention_heads,
            num_key_value_heads: report.num_key_value_heads,
            head_dim: report.head_dim,
        }
    }
}

impl Plan {
    /// Replaces every group whose mean recency is >= `tau`, then keeps at least `min_keep`
    /// attention groups per layer (see the module doc).
    pub fn by_threshold(report: &RecencyReport, tau: f64, min_keep: usize) -> Result<Self> {
        Self::by_threshold_excluding(report, tau, min_keep, &[])
    }

    /// [`Plan::by_threshold`] that never replaces a group marked in `excluded` (per layer, per
    /// group; an empty slice excludes nothing). `convert::protect` passes the protected groups.
    pub(crate) fn by_threshold_excluding(
        report: &RecencyReport,
        tau: f64,
        min_keep: usize,
        excluded: &[Vec<bool>],
    ) -> Result<Self> {
        if !tau.is_finite() {
            bail!("threshold {tau} is not a finite number");
        }
        let scores = group_score_table(report)?;
        let chosen: Vec<Vec<usize>> = scores
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                (0..layer.len())
                    .filter(|&g| layer[g] >= tau && !is_excluded(excluded, l, g))
                    .collect::<Vec<_>>()
            })
            .collect();
        Self::finish(
            report,
            Selection::Threshold { tau },
            min_keep,
            &scores,
            chosen,
        )
    }

    /// Replaces the `n = round(f * total_groups)` groups with the highest mean recency across all
    /// layers while keeping at least `min_keep` attention groups per layer: a group whose layer is
    /// already at its limit is skipped and the next-ranked group taken, so exactly `n` groups are
    /// replaced whenever `n <= layers * (num_kv_heads - min_keep)`.
    ///
    /// Rounding: `n = (f * total_groups).round()` with `f64::round`, i.e. to the nearest integer and
    /// halves away from zero (F = 0.5 of 5 groups replaces 3; F = 0.5 of 90 replaces 45).
    /// Order: groups are ranked by mean recency, highest first; equal scores rank by
    /// (layer, group) ascending, so the lower layer, then the lower group index, is replaced first.
    /// `f` must lie in [0, 1].
    pub fn by_fraction(report: &RecencyReport, f: f64, min_keep: usize) -> Result<Self> {
        Self::by_fraction_excluding(report, f, min_keep, &[])
    }

    /// [`Plan::by_fraction`] that skips the groups marked in `excluded` as it walks the ranking,
    /// like a group whose layer is at its limit: the budget is filled from the next-ranked groups,
    /// and fewer than `n` are replaced only when too few groups remain.
    pub(crate) fn by_fraction_excluding(
        report: &RecencyReport,
        f: f64,
        min_keep: usize,
        excluded: &[Vec<bool>],
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&f) {
            bail!("replace fraction {f} is outside [0, 1]");
        }
        let scores = group_score_table(report)?;
        let total: usize = scores.iter().map(Vec::len).sum();
        let n = (f * total as f64).round() as usize;
        let mut ranked: Vec<(usize, usize, f64)> = scores
            .iter()
            .enumerate()
            .flat_map(|(l, gs)| gs.iter().enumerate().map(move |(g, &s)| (l, g, s)))
            .collect();
        // Highest score first; ties by (layer, group) ascending. Scores are finite (checked).
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        // Walk the ranking and take groups until n are chosen, skipping a group whose layer has
        // already given up all it may (num_kv_heads - min_keep): the fraction is honoured
        // whenever the per-layer minimum allows it, instead of handing groups back afterwards.
        let max_replaced = report.num_key_value_heads.saturating_sub(min_keep);
        let mut chosen = vec![Vec::new(); scores.len()];
        let mut taken = 0;
        for &(l, g, _) in &ranked {
            if taken == n {
                break;
            }
            if chosen[l].len() < max_replaced && !is_excluded(excluded, l, g) {
                chosen[l].push(g);
                taken += 1;
            }
        }
        let selection = Selection::ReplaceFraction {
            replace_fraction: f,
            requested_groups: n,
        };
        Self::finish(report, selection, min_keep, &scores, chosen)
    }

    /// Applies the per-layer minimum, records the rule, builds the layers.
    fn finish(
        report: &RecencyReport,
        selection: Selection,
        min_keep: usize,
        scores: &[Vec<f64>],
        mut chosen: Vec<Vec<usize>>,
    ) -> Result<Self> {
        let shape = PlanShape::from_report(report);
        if min_keep > shape.num_key_value_heads {
            bail!(
                "min_attention_groups_per_layer {min_keep} exceeds the {} KV groups per layer",
                shape.num_key_value_heads
            );
        }
        let max_replaced = shape.num_key_value_heads - min_keep;
        for (l, groups) in chosen.iter_mut().enumerate() {
            if groups.len() > max_replaced {
                // Keep the best-scoring replaced groups; the lowest-scoring ones go back to
                // attention. Ties: the higher group index goes back first, mirroring the
                // fraction rule's (layer, group)-ascending preference.
                groups.sort_by(|&a, &b| scores[l][b].total_cmp(&scores[l][a]).then(a.cmp(&b)));
                groups.truncate(max_replaced);
            }
        }
        let rule = PlanRule {
            selection,
            min_attention_groups_per_layer: min_keep,
            window: Some(report.window),
            recency_file: None,
            recency_model: Some(report.model.clone()),
            protection: None,
            harm: None,
            refine: None,
        };
        let plan = Self::from_mamba_sets(shape, rule, &chosen);
        plan.validate_shape(
            shape.num_layers,
            shape.num_attention_heads,
            shape.num_key_value_heads,
        )?;
        Ok(plan)
    }
}

fn is_excluded(excluded: &[Vec<bool>], layer: usize, group: usize) -> bool {
    excluded
        .get(layer)
        .and_then(|l| l.get(group))
        .copied()
        .unwrap_or(false)
}

/// Per layer, per group mean recency, checked finite and in group order.
fn group_score_table(report: &RecencyReport) -> Result<Vec<Vec<f64>>> {
    report.validate().context("recency report")?;
    report
        .layers
        .iter()
        .map(|l| {
            l.groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    if g.group != i {
                        bail!(
                            "recency report layer {}: group entry {i} is for group {}",
                            l.layer,
                            g.group
                        );
                    }
                    if !g.mean_recency.is_finite() {
                        bail!(
                            "recency report layer {} group {i}: mean recency {} is not finite",
                            l.layer,
                            g.mean_recency
                        );
                    }
                    Ok(g.mean_recency)
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::convert::recency::{group_stats, Calibration, HeadStats, LayerStats};
    use crate::formats::config::Architecture;
    use crate::formats::config::ModelConfig;
    use crate::model::plan::*;

    /// A report whose query heads have the given recency scores (per layer), `n_kv` KV groups.
    pub(crate) fn report(heads: &[Vec<f64>], n_kv: usize, head_dim: usize) -> RecencyReport {
        let nh = heads[0].len();
        let layers = heads
            .iter()
            .enumerate()
            .map(|(l, hs)| {
                let heads: Vec<HeadStats> = hs
                    .iter()
                    .enumerate()
                    .map(|(h, &r)| HeadStats {
                        head: h,
                        recency: r,
                        sink: 0.0,
                        distance: 1.0,
                        output_rms: 1.0,
                    })
                    .collect();
                LayerStats {
                    layer: l,
                    groups: group_stats(&heads, nh / n_kv),
                    heads,
                }
            })
            .collect();
        RecencyReport {
            model: "synthetic".into(),
            num_layers: heads.len(),
            num_attention_heads: nh,
            num_key_value_heads: n_kv,
            head_dim,
            window: 32,
            sink_tokens: 4,
            calibration: Calibration::default(),
            layers,
            probes: None,
        }
    }

    /// A report with one query head per group (MHA): the head scores are the group scores.
    fn mha(scores: &[&[f64]]) -> RecencyReport {
        let v: Vec<Vec<f64>> = scores.iter().map(|s| s.to_vec()).collect();
        report(&v, v[0].len(), 8)
    }

    fn mamba_sets(p: &Plan) -> Vec<Vec<usize>> {
        p.layers.iter().map(|l| l.mamba_groups.clone()).collect()
    }

    fn config(layers: usize, nh: usize, n_kv: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 100,
            hidden_size: nh * head_dim,
            intermediate_size: 4 * nh * head_dim,
            num_hidden_layers: layers,
            num_attention_heads: nh,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn threshold_picks_groups_at_or_above_tau() {
        let r = mha(&[&[0.9, 0.5, 0.7], &[0.7, 0.69, 0.1], &[0.2, 0.3, 0.4]]);
        let p = Plan::by_threshold(&r, 0.7, 0).unwrap();
        // 0.7 >= 0.7 is replaced; 0.69 is not.
        assert_eq!(mamba_sets(&p), vec![vec![0, 2], vec![0], vec![]]);
        assert_eq!(p.layers[0].attention_groups, vec![1]);
        assert_eq!(p.rule.selection, Selection::Threshold { tau: 0.7 });
        assert_eq!(p.rule.window, Some(32));
        assert_eq!(p.rule.recency_model.as_deref(), Some("synthetic"));
    }

    #[test]
    fn threshold_uses_group_means_under_gqa() {
        // 4 query heads, 2 KV groups: group means are 0.8, 0.5 | 0.65, 0.75.
        let r = report(
            &[vec![0.9, 0.7, 0.2, 0.8], vec![0.6, 0.7, 0.95, 0.55]],
            2,
            8,
        );
        let p = Plan::by_threshold(&r, 0.7, 0).unwrap();
        assert_eq!(mamba_sets(&p), vec![vec![0], vec![1]]);
        assert_eq!(p.layers[0].mamba_heads, vec![0, 1]);
        assert_eq!(p.layers[0].attention_heads, vec![2, 3]);
        assert_eq!(p.layers[1].mamba_heads, vec![2, 3]);
        assert_eq!(p.layers[1].attention_heads, vec![0, 1]);
    }

    #[test]
    fn threshold_min_keep_hands_back_lowest_scoring() {
        let r = mha(&[&[0.9, 0.8, 0.95], &[0.9, 0.9, 0.9], &[0.1, 0.99, 0.2]]);
        let p = Plan::by_threshold(&r, 0.5, 1).unwrap();
        // Layer 0: all three qualify, the lowest (group 1, 0.8) goes back.
        // Layer 1: a three-way tie: the highest group index goes back.
        // Layer 2: only group 1 qualifies, one attention group is left anyway.
        assert_eq!(mamba_sets(&p), vec![vec![0, 2], vec![0, 1], vec![1]]);
        let p = Plan::by_threshold(&r, 0.5, 2).unwrap();
        assert_eq!(mamba_sets(&p), vec![vec![2], vec![0], vec![1]]);
        let p = Plan::by_threshold(&r, 0.5, 3).unwrap();
        assert!(p.is_empty());
        let e = Plan::by_threshold(&r, 0.5, 4).unwrap_err().to_string();
        assert!(e.contains('4') && e.contains('3'), "{e}");
    }

    #[test]
    fn fraction_picks_global_top_with_ties_by_layer_then_group() {
        let r = mha(&[&[0.5, 0.9, 0.5], &[0.5, 0.8, 0.1], &[0.5, 0.2, 0.3]]);
        // 9 groups. F = 1/3 -> 3 groups: 0.9 (L0 g1), 0.8 (L1 g1), then the first 0.5 in
        // (layer, group) order: L0 g0.
        let p = Plan::by_fraction(&r, 1.0 / 3.0, 0).unwrap();
        assert_eq!(mamba_sets(&p), vec![vec![0, 1], vec![1], vec![]]);
        assert_eq!(
            p.rule.selection,
            Selection::ReplaceFraction {
                replace_fraction: 1.0 / 3.0,
                requested_groups: 3
            }
        );
        // F = 0.5 -> round(4.5) = 5: the three 0.5 ties after L0 g0 are L0 g2, L1 g0, L2 g0.
        let p = Plan::by_fraction(&r, 0.5, 0).unwrap();
        assert_eq!(mamba_sets(&p), vec![vec![0, 1, 2], vec![0, 1], vec![]]);
        // F = 0.45 -> round(4.05) = 4.
        let p = Plan::by_fraction(&r, 0.45, 0).unwrap();
        assert_eq!(p.replaced_groups(), 4);
        assert_eq!(Plan::by_fraction(&r, 0.0, 0).unwrap().replaced_groups(), 0);
        assert_eq!(Plan::by_fraction(&r, 1.0, 0).unwrap().replaced_groups(), 9);
        assert!(Plan::by_fraction(&r, 1.5, 0).is_err());
        assert!(Plan::by_fraction(&r, f64::NAN, 0).is_err());
    }

    #[test]
    fn fraction_min_keep_takes_the_next_best_group() {
        let r = mha(&[&[0.9, 0.95, 0.99], &[0.1, 0.2, 0.3]]);
        // F = 0.5 of 6 -> 3. The best three are all in layer 0, but K = 1 lets layer 0 give up
        // only two (g2, g1); the third pick is the next-ranked group elsewhere: layer 1 g2.
        let p = Plan::by_fraction(&r, 0.5, 1).unwrap();
        assert_eq!(mamba_sets(&p), vec![vec![1, 2], vec![2]]);
        assert_eq!(p.replaced_groups(), 3);
        p.validate_shape(2, 3, 3).unwrap();
    }

    #[test]
    fn empty_plan_has_ratio_one() {
        let cfg = config(4, 6, 2, 16);
        let p = Plan::empty(&cfg);
        p.validate(&cfg).unwrap();
        assert!(p.is_empty());
        assert_eq!(p.predicted_cache.len(), PREDICTED_TOKENS.len());
        for c in &p.predicted_cache {
            assert_eq!(c.ratio_to_base, 1.0);
            assert_eq!(c.mamba_state_bytes, 0);
            assert_eq!(c.kv_bytes, c.base_kv_bytes);
            assert_eq!(c.base_kv_bytes, cfg.kv_bytes_per_token() * c.tokens);
        }
        assert!(p
            .layers
            .iter()
            .all(|l| l.attention_heads == (0..6).collect::<Vec<_>>()));
    }

    #[test]
    fn byte_formulas_worked_example() {
        // One replaced group of g = 3 heads, P = N = 64, kernel 4:
        // SSM 3 * 64 * 64 * 4 = 49152; conv (64 + 64 + 3 * 64) * 3 * 4 = 320 * 12 = 3840.
        assert_eq!(mixer_state_bytes(3, 64, 64, 4), 49152 + 3840);
        // g = 1, P = 2, N = 3, kernel 4: SSM 1*2*3*4 = 24; conv (2 + 3 + 3) * 3 * 4 = 96.
        assert_eq!(mixer_state_bytes(1, 2, 3, 4), 120);
        assert_eq!(kv_cache_bytes(90, 64, 1024), 2 * 90 * 64 * 4 * 1024);

        // SmolLM2-135M shape (30 layers, 9 heads, 3 KV heads, head_dim 64), half the groups.
        let scores: Vec<Vec<f64>> = (0..30)
            .map(|l| (0..9).map(|h| ((l * 9 + h) % 7) as f64 / 7.0).collect())
            .collect();
        let p = Plan::by_fraction(&report(&scores, 3, 64), 0.5, 0).unwrap();
        assert_eq!(p.replaced_groups(), 45);
        let c = p.predicted_bytes(1024);
        assert_eq!(c.base_kv_bytes, 47_185_920);
        assert_eq!(c.kv_bytes, 23_592_960);
        assert_eq!(c.mamba_state_bytes, 45 * 52_992);
        assert_eq!(c.total_bytes, 23_592_960 + 2_384_640);
        assert!((c.ratio_to_base - 25_977_600.0 / 47_185_920.0).abs() < 1e-12);
        let c = p.predicted_bytes(131072);
        assert_eq!(c.base_kv_bytes, 6_039_797_760);
        assert_eq!(c.mamba_state_bytes, 2_384_640);
    }

    fn smol_plan() -> (Plan, ModelConfig) {
        let r = report(
            &[
                vec![0.9, 0.9, 0.9, 0.1, 0.1, 0.1],
                vec![0.1, 0.1, 0.1, 0.9, 0.9, 0.9],
            ],
            2,
            8,
        );
        (Plan::by_threshold(&r, 0.5, 0).unwrap(), config(2, 6, 2, 8))
    }

    fn expect_err(p: &Plan, cfg: &ModelConfig, needles: &[&str]) {
        let e = format!("{:#}", p.validate(cfg).unwrap_err());
        for n in needles {
            assert!(e.contains(n), "error {e:?} lacks {n:?}");
        }
    }

    #[test]
    fn invalid_plans_are_rejected_with_numbers() {
        let (p, cfg) = smol_plan();
        p.validate(&cfg).unwrap();

        // Wrong layer count (the model has 3 layers).
        expect_err(&p, &config(3, 6, 2, 8), &["2 layers", "3 layers"]);
        let mut q = p.clone();
        q.layers.pop();
        expect_err(&q, &cfg, &["1 layers", "model has 2"]);
        // Wrong head_dim.
        expect_err(&p, &config(2, 6, 2, 16), &["head_dim 8", "head_dim 16"]);

        // Partial group: head 2 of group 0 moved to the attention side in layer 1.
        let mut q = p.clone();
        q.layers[1] = LayerPlan {
            layer: 1,
            attention_groups: vec![0],
            attention_heads: vec![0, 1],
            mamba_groups: vec![1],
            mamba_heads: vec![2, 3, 4, 5],
        };
        expect_err(&q, &cfg, &["layer 1", "head 2", "group 0", "whole"]);
        let mut q = p.clone();
        q.layers[0].mamba_heads = vec![0, 1];
        expect_err(&q, &cfg, &["layer 0", "lacks head 2", "group 0"]);

        // Out-of-range group and head.
        let mut q = p.clone();
        q.layers[1].mamba_groups = vec![1, 2];
        expect_err(&q, &cfg, &["layer 1", "index 2", "2 KV groups"]);
        let mut q = p.clone();
        q.layers[0].mamba_heads = vec![0, 1, 2, 6];
        expect_err(&q, &cfg, &["layer 0", "index 6", "6 query heads"]);

        // Duplicate group: in both lists, or twice in one.
        let mut q = p.clone();
        q.layers[0].attention_groups = vec![0, 1];
        q.layers[0].attention_heads = (0..6).collect();
        expect_err(&q, &cfg, &["layer 0", "group 0", "both"]);
        let mut q = p.clone();
        q.layers[1].mamba_groups = vec![1, 1];
        expect_err(&q, &cfg, &["layer 1", "lists 1 twice"]);
        // Missing group.
        let mut q = p.clone();
        q.layers[1].attention_groups = vec![];
        q.layers[1].attention_heads = vec![];
        expect_err(&q, &cfg, &["layer 1", "group 0", "neither"]);

        // The rule's per-layer minimum.
        let mut q = p.clone();
        q.rule.min_attention_groups_per_layer = 2;
        expect_err(&q, &cfg, &["layer 0", "1 attention groups", "at least 2"]);
    }

    #[test]
    fn save_load_round_trip_and_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, cfg) = smol_plan();
        p.rule.recency_file = Some("recency.json".into());
        let path = dir.path().join("plan.json");
        p.save(&path).unwrap();
        let q = Plan::load(&path, &cfg).unwrap();
        assert_eq!(p, q);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"kind\": \"threshold\""), "{text}");
        assert!(text.contains("\"predicted_cache\""), "{text}");

        // Malformed JSON names the file.
        let bad = dir.path().join("broken.json");
        std::fs::write(&bad, &text[..text.len() / 2]).unwrap();
        let e = format!("{:#}", Plan::load(&bad, &cfg).unwrap_err());
        assert!(e.contains("broken.json"), "{e}");

        // A structurally valid file that splits a group: the error names the file and layer.
        let edited = text.replacen("\"mamba_heads\": [\n        0,", "\"mamba_heads\": [", 1);
        assert_ne!(edited, text);
        std::fs::write(&bad, edited).unwrap();
        let e = format!("{:#}", Plan::load(&bad, &cfg).unwrap_err());
        assert!(
            e.contains("broken.json") && e.contains("layer 0") && e.contains("head 0"),
            "{e}"
        );
    }

    #[test]
    fn summary_and_table_render() {
        let (p, _) = smol_plan();
        let s = p.layer_summary();
        assert!(s.contains("layer   0: mamba g0 (h0-2)"), "{s}");
        let t = p.cache_table();
        assert!(t.contains("128K") && t.contains("0.50"), "{t}");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
