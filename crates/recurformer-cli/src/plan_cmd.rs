//! `recurformer plan`: choose the KV groups to convert from a recency report and write plan.json.
//!
//! No model is loaded: the model shape comes from the report, and the plan is validated against
//! it before it is written.

use anyhow::{Context, Result};
use clap::Args;
use recurformer::convert::recency::RecencyReport;
use recurformer::formats::io::shown_path;
use recurformer::model::plan::{Plan, PlanShape};
use std::path::PathBuf;

/// Options of `recurformer plan`.
#[derive(Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("rule")
        .required(true)
        .args(["threshold", "replace_fraction"])
))]
pub struct PlanArgs {
    /// recency.json written by `recurformer analyze`.
    #[arg(long, value_name = "FILE")]
    pub recency: PathBuf,
    /// Replace every KV group whose mean recency score is >= T (scores lie in [0, 1]).
    /// Exclusive with --replace-fraction.
    #[arg(long, value_name = "T")]
    pub threshold: Option<f64>,
    /// Replace round(F * total KV groups) groups, those with the highest mean recency across all
    /// layers (ties: lower layer, then lower group first). F in [0, 1]. Exclusive with --threshold.
    #[arg(long, value_name = "F")]
    pub replace_fraction: Option<f64>,
    /// Keep at least K attention groups in every layer: a layer over the limit hands back its
    /// lowest-scoring replaced groups (they are not replaced elsewhere instead). 0 allows layers
    /// with no attention at all.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub min_attention_groups_per_layer: usize,
    /// Where to write plan.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the recency heatmap with the replaced groups framed, as PNG.
    #[arg(long, value_name = "PNG")]
    pub heatmap: Option<PathBuf>,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let report = RecencyReport::load(&args.recency)?;
    let k = args.min_attention_groups_per_layer;
    let mut plan = match (args.threshold, args.replace_fraction) {
        (Some(tau), None) => Plan::by_threshold(&report, tau, k)?,
        (None, Some(f)) => Plan::by_fraction(&report, f, k)?,
        // clap's "rule" group makes exactly one of them present.
        _ => anyhow::bail!("give exactly one of --threshold and --replace-fraction"),
    };
    plan.rule.recency_file = Some(shown_path(&args.recency));
    let shape = PlanShape::from_report(&report);
    plan.validate_shape(
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    )?;
    plan.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let total = shape.num_layers * shape.num_key_value_heads;
    println!(
        "{}: {} layers, {} query heads, {} KV groups of {} (head_dim {}), window {}",
        report.model,
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
        shape.group_size(),
        shape.head_dim,
        report.window
    );
    println!("group scores (mean recency); M = replaced by Mamba, A = stays attention");
    for (lp, ls) in plan.layers.iter().zip(&report.layers) {
        let cells: Vec<String> = ls
            .groups
            .iter()
            .map(|g| {
                let tag = if lp.mamba_groups.contains(&g.group) {
                    'M'
                } else {
                    'A'
                };
                format!("g{} {:.3} {tag}", g.group, g.mean_recency)
            })
            .collect();
        println!("  layer {:>3}: {}", lp.layer, cells.join("  "));
    }
    println!(
        "replaced {} of {total} KV groups ({:.1}%), {} query heads",
        plan.replaced_groups(),
        100.0 * plan.replaced_groups() as f64 / total.max(1) as f64,
        plan.layers
            .iter()
            .map(|l| l.mamba_heads.len())
            .sum::<usize>()
    );
    if let recurformer::model::plan::Selection::ReplaceFraction {
        replace_fraction,
        requested_groups,
    } = plan.rule.selection
    {
        if plan.replaced_groups() < requested_groups {
            eprintln!(
                "warning: --replace-fraction {replace_fraction} asks for {requested_groups} groups, but \
                 --min-attention-groups-per-layer {} leaves at most {} per layer ({} in all); \
                 replaced {} instead",
                plan.rule.min_attention_groups_per_layer,
                shape
                    .num_key_value_heads
                    .saturating_sub(plan.rule.min_attention_groups_per_layer),
                shape.num_layers
                    * shape
                        .num_key_value_heads
                        .saturating_sub(plan.rule.min_attention_groups_per_layer),
                plan.replaced_groups()
            );
        }
    }
    println!("\npredicted cache (f32; KV of kept groups + Mamba conv/SSM state, vs the base KV):");
    print!("{}", plan.cache_table());

    if let Some(png) = &args.heatmap {
        recurformer::report::recency_heatmap_with_plan(&report, &plan, png)?;
        println!("wrote {}", png.display());
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `recurformer recency-diff`: how stable the scores and the chosen groups are between two
/// calibration sets.
#[derive(Args)]
pub struct RecencyDiffArgs {
    /// First recency report (e.g. from Austen).
    pub a: PathBuf,
    /// Second recency report of the same model (e.g. from the essays).
    pub b: PathBuf,
    /// Replacement fractions at which to compare the chosen group sets.
    #[arg(long, num_args = 1.., default_values_t = [0.25, 0.5, 0.75])]
    pub fractions: Vec<f64>,
    /// Minimum attention groups kept per layer for those plans.
    #[arg(long, default_value_t = 0)]
    pub min_attention_groups_per_layer: usize,
}

pub fn recency_diff(args: RecencyDiffArgs) -> Result<()> {
    use recurformer::convert::recency::{spearman, RecencyReport};
    let a = RecencyReport::load(&args.a)?;
    let b = RecencyReport::load(&args.b)?;
    if (a.num_layers, a.num_attention_heads, a.num_key_value_heads)
        != (b.num_layers, b.num_attention_heads, b.num_key_value_heads)
    {
        anyhow::bail!(
            "{} and {} are for different model shapes ({}x{} heads vs {}x{})",
            args.a.display(),
            args.b.display(),
            a.num_layers,
            a.num_attention_heads,
            b.num_layers,
            b.num_attention_heads
        );
    }
    let ga: Vec<f64> = a.group_scores().iter().map(|g| g.2).collect();
    let gb: Vec<f64> = b.group_scores().iter().map(|g| g.2).collect();
    let heads = |r: &RecencyReport| -> Vec<f64> {
        r.layers
            .iter()
            .flat_map(|l| l.heads.iter().map(|h| h.recency))
            .collect()
    };
    println!(
        "Spearman rank correlation, KV-group mean recency ({} groups): {:.4}",
        ga.len(),
        spearman(&ga, &gb)?
    );
    println!(
        "Spearman rank correlation, query-head recency ({} heads):  {:.4}",
        heads(&a).len(),
        spearman(&heads(&a), &heads(&b))?
    );
    println!(
        "{:>9} {:>9} {:>9} {:>8} {:>8}",
        "fraction", "replaced", "common", "changed", "jaccard"
    );
    for &f in &args.fractions {
        let pa = recurformer::model::plan::Plan::by_fraction(
            &a,
            f,
            args.min_attention_groups_per_layer,
        )?;
        let pb = recurformer::model::plan::Plan::by_fraction(
            &b,
            f,
            args.min_attention_groups_per_layer,
        )?;
        let set =
            |p: &recurformer::model::plan::Plan| -> std::collections::BTreeSet<(usize, usize)> {
                p.layers
                    .iter()
                    .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
                    .collect()
            };
        let (sa, sb) = (set(&pa), set(&pb));
        let common = sa.intersection(&sb).count();
        let union = sa.union(&sb).count();
        println!(
            "{:>9.2} {:>9} {:>9} {:>8} {:>8.3}",
            f,
            sa.len(),
            common,
            sa.len() - common,
            if union == 0 {
                1.0
            } else {
                common as f64 / union as f64
            }
        );
    }
    Ok(())
}
