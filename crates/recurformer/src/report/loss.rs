//! The training loss curve (`train`, `loss.png`): train and held-out loss per stage.

use crate::report::render::{draw_err, render_png, FONT};
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// Size of the loss-curve PNG: one 640 x 420 panel per stage in the log, side by side.
pub fn loss_plot_size(stages: usize) -> (u32, u32) {
    (640 * stages.max(1) as u32, 420)
}

/// Draws train loss (per step) and held-out loss (per evaluation) of each stage in `log`, one
/// panel per stage, log-scale y when every value is positive; written atomically as PNG.
pub fn plot_losses(log: &[Value], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut stages: Vec<(u64, String)> = Vec::new();
    for r in log
        .iter()
        .filter(|r| r["kind"] == "step" || r["kind"] == "eval")
    {
        if let (Some(si), Some(name)) = (r["stage_index"].as_u64(), r["stage"].as_str()) {
            if !stages.iter().any(|(i, _)| *i == si) {
                stages.push((si, name.to_string()));
            }
        }
    }
    stages.sort();
    let size = loss_plot_size(stages.len());
    render_png(path, size, |root| {
        let panels = root.split_evenly((1, stages.len().max(1)));
        for ((si, name), panel) in stages.iter().zip(panels.iter()) {
            let pick = |kind: &str, field: &str| -> Vec<(f64, f64)> {
                log.iter()
                    .filter(|r| r["kind"] == kind && r["stage_index"].as_u64() == Some(*si))
                    .filter_map(|r| Some((r["step"].as_f64()?, r[field].as_f64()?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect()
            };
            let train = pick("step", "loss");
            let held = pick("eval", "heldout_loss");
            let all: Vec<f64> = train.iter().chain(&held).map(|p| p.1).collect();
            if all.is_empty() {
                continue;
            }
            let xmax = train
                .iter()
                .chain(&held)
                .map(|p| p.0)
                .fold(1.0f64, f64::max);
            let (lo, hi) = all
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            let what = if name == "align" {
                "normalised MSE"
            } else {
                "KL(teacher || student)"
            };
            let caption = format!("{name}: {what}");
            let mut builder = ChartBuilder::on(panel);
            builder
                .caption(caption, (FONT, 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70);
            // One drawing routine for both axis kinds.
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc("step")
                        .y_desc("loss")
                        .label_style((FONT, 12))
                        .axis_desc_style((FONT, 14))
                        .y_label_formatter(&|v| format!("{v:.3}"))
                        .draw()
                        .map_err(draw_err)?;
                    let blue = RGBColor(31, 119, 180);
                    let red = RGBColor(214, 39, 40);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            train.clone(),
                            blue.stroke_width(1),
                        )))
                        .map_err(draw_err)?
                        .label("train")
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(2))
                        });
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            held.clone(),
                            red.stroke_width(2),
                        )))
                        .map_err(draw_err)?
                        .label("held-out")
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], red.stroke_width(2))
                        });
                    chart
                        .draw_series(held.iter().map(|&p| Circle::new(p, 3, red.filled())))
                        .map_err(draw_err)?;
                    chart
                        .configure_series_labels()
                        .label_font((FONT, 12))
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(draw_err)?;
                }};
            }
            if lo > 0.0 && hi / lo > 3.0 {
                draw!(builder
                    .build_cartesian_2d(0f64..xmax, (lo * 0.9..hi * 1.1).log_scale())
                    .map_err(draw_err)?);
            } else {
                let pad = ((hi - lo) * 0.08).max(1e-6);
                draw!(builder
                    .build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad))
                    .map_err(draw_err)?);
            }
        }
        Ok(())
    })
}
