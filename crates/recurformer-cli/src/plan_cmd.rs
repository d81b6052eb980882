//! `recurformer plan`: choose the KV groups to convert from a recency report and write plan.json.
//!
//! No model is loaded: the model shape comes from the report, and the plan is validated against
//! it before it is written.

use anyhow::{Context, Result};
use clap::Args;
use recurformer::plan::{Plan, PlanShape};
use recurformer::recency::RecencyReport;
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
    plan.rule.recency_file = Some(args.recency.display().to_string());
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
    println!("\npredicted cache (f32; KV of kept groups + Mamba conv/SSM state, vs the base KV):");
    print!("{}", plan.cache_table());

    if let Some(png) = &args.heatmap {
        recurformer::plot::recency_heatmap_with_plan(&report, &plan, png)?;
        println!("wrote {}", png.display());
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
