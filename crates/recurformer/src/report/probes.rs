//! Figures of the head probes (`convert::probes`): one layers x query-heads heatmap per probe,
//! drawn by the recency heatmap's machinery (`report::recency`), optionally with a plan's replaced
//! groups framed so a reader sees which retrieval heads a plan would drop.

use crate::convert::probes::Probe;
use crate::convert::recency::RecencyReport;
use crate::model::plan::{Plan, PlanShape};
use crate::report::recency::{heatmap, HeadGrid};
use anyhow::{bail, Context, Result};
use std::path::Path;

fn probe_grid(report: &RecencyReport, probe: Probe) -> Result<HeadGrid<'_>> {
    report.validate().context("recency report")?;
    let probes = report
        .probes
        .as_ref()
        .with_context(|| format!("the recency report of {} has no probe scores", report.model))?;
    let values = probes
        .layers
        .iter()
        .map(|l| {
            l.heads
                .iter()
                .map(|h| {
                    h.scores.get(probe).with_context(|| {
                        format!(
                            "the recency report has no {} score (layer {} head {})",
                            probe.name(),
                            l.layer,
                            h.head
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(HeadGrid {
        title: format!("Head probe - {}", probe.describe()),
        model: &report.model,
        num_layers: report.num_layers,
        num_attention_heads: report.num_attention_heads,
        num_key_value_heads: report.num_key_value_heads,
        values,
        bar_label: probe.name(),
    })
}

/// Pixel size of the PNG [`probe_heatmap`] writes (that of the recency heatmap).
pub fn probe_heatmap_size(report: &RecencyReport) -> (u32, u32) {
    crate::report::recency::heatmap_size(report)
}

/// Heatmap of one probe's per-head scores, with `plan`'s replaced groups framed in red when
/// given. Written atomically to `path` as PNG of [`probe_heatmap_size`].
pub fn probe_heatmap(
    report: &RecencyReport,
    probe: Probe,
    plan: Option<&Plan>,
    path: &Path,
) -> Result<()> {
    let grid = probe_grid(report, probe)?;
    if let Some(p) = plan {
        if p.shape != PlanShape::from_report(report) {
            bail!(
                "plan is for {:?}, the recency report for {:?}",
                p.shape,
                PlanShape::from_report(report)
            );
        }
    }
    heatmap(&grid, plan, path)
}
