//! Figures of a recency analysis (`analyze`, `plan`): the layers x query-heads heatmap of the
//! recency score, optionally with a plan's replaced groups marked, and the per-layer distribution.

use crate::convert::recency::RecencyReport;
use crate::model::plan::{Plan, PlanShape};
use crate::report::render::{draw_err, keep_tail, label_count, render_png, viridis, FONT};
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Heatmap geometry, derived from the model shape so cells stay readable.
struct HeatmapLayout {
    cell_w: u32,
    cell_h: u32,
    left: u32,
    top: u32,
    bottom: u32,
    bar: u32,
}

impl HeatmapLayout {
    fn new(nh: usize, nl: usize) -> Self {
        let nh = nh.max(1) as u32;
        let nl = nl.max(1) as u32;
        HeatmapLayout {
            cell_w: (720 / nh).clamp(10, 64),
            cell_h: (720 / nl).clamp(8, 28),
            left: 80,
            top: 64,
            bottom: 70,
            bar: 130,
        }
    }

    fn size(&self, nh: usize, nl: usize) -> (u32, u32) {
        let (nh, nl) = (nh as u32, nl as u32);
        (
            (self.left + 8 + nh * self.cell_w + 20 + self.bar).max(560),
            self.top + nl * self.cell_h + self.bottom,
        )
    }
}

/// What a layers x query-heads heatmap shows: one value in [0, 1] per (layer, head).
pub(crate) struct HeadGrid<'a> {
    pub title: String,
    /// The model name; the plan's legend is appended to it.
    pub model: &'a str,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// values[layer][head].
    pub values: Vec<Vec<f64>>,
    /// The colour bar's caption.
    pub bar_label: &'a str,
}

impl HeadGrid<'_> {
    pub(crate) fn size(&self) -> (u32, u32) {
        HeatmapLayout::new(self.num_attention_heads, self.num_layers)
            .size(self.num_attention_heads, self.num_layers)
    }
}

/// Pixel size of the PNG [`recency_heatmap`] writes for `report`.
pub fn heatmap_size(report: &RecencyReport) -> (u32, u32) {
    recency_grid(report).size()
}

fn recency_grid(report: &RecencyReport) -> HeadGrid<'_> {
    HeadGrid {
        title: format!("Recency score R(l,h), window w = {}", report.window),
        model: &report.model,
        num_layers: report.num_layers,
        num_attention_heads: report.num_attention_heads,
        num_key_value_heads: report.num_key_value_heads,
        values: report
            .layers
            .iter()
            .map(|l| l.heads.iter().map(|h| h.recency).collect())
            .collect(),
        bar_label: "recency",
    }
}

/// Pixel size of the PNG [`recency_distribution`] writes for `report`.
pub fn distribution_size(report: &RecencyReport) -> (u32, u32) {
    let nl = report.num_layers.max(1) as u32;
    // 36 px per layer for up to ~40 layers, narrower beyond so the figure stays under ~2000 px.
    let layer_px = (1600 / nl).clamp(12, 36);
    ((250 + layer_px * nl).max(760), 560)
}

fn check_report(report: &RecencyReport) -> Result<()> {
    report.validate().context("recency report")?;
    if report.num_layers == 0 {
        bail!("recency report has no layers: nothing to plot");
    }
    Ok(())
}

/// Heatmap of recency scores: layers (y, layer 0 on top) x query heads (x), viridis colour with a
/// colour bar, KV group boundaries as thick white separators, the score printed in each cell when
/// it fits. Written atomically to `path` as PNG of [`heatmap_size`].
pub fn recency_heatmap(report: &RecencyReport, path: &Path) -> Result<()> {
    check_report(report)?;
    heatmap(&recency_grid(report), None, path)
}

/// [`recency_heatmap`] with the groups that `plan` replaces framed in red.
pub fn recency_heatmap_with_plan(report: &RecencyReport, plan: &Plan, path: &Path) -> Result<()> {
    check_report(report)?;
    if plan.shape != PlanShape::from_report(report) {
        bail!(
            "plan is for {:?}, the recency report for {:?}",
            plan.shape,
            PlanShape::from_report(report)
        );
    }
    plan.validate_shape(
        report.num_layers,
        report.num_attention_heads,
        report.num_key_value_heads,
    )?;
    heatmap(&recency_grid(report), Some(plan), path)
}

/// Draws `grid` (optionally with `plan`'s replaced groups framed in red) to `path` as PNG of
/// `grid.size()`. The caller has checked the grid's shape (and the plan's against it).
pub(crate) fn heatmap(grid: &HeadGrid, plan: Option<&Plan>, path: &Path) -> Result<()> {
    let (nh, nl, n_kv) = (
        grid.num_attention_heads,
        grid.num_layers,
        grid.num_key_value_heads,
    );
    if nl == 0 || n_kv == 0 || nh % n_kv != 0 || grid.values.len() != nl {
        bail!(
            "heatmap of {nl} layers, {nh} heads over {n_kv} groups with {} rows of values",
            grid.values.len()
        );
    }
    let lay = HeatmapLayout::new(nh, nl);
    let size = lay.size(nh, nl);
    let gs = nh / n_kv;
    render_png(path, size, |root| {
        let (main, bar) = root.split_horizontally(size.0 - lay.bar);
        root.draw_text(&grid.title, &(FONT, 17).into_text_style(root), (10, 8))
            .map_err(draw_err)?;
        let mut subtitle = grid.model.to_string();
        if let Some(p) = plan {
            subtitle.push_str(&format!(
                "; red frames: {} of {} KV groups replaced by Mamba",
                p.replaced_groups(),
                nl * n_kv
            ));
        }
        root.draw_text(
            &keep_tail(&subtitle, (size.0 as usize - 20) / 7),
            &(FONT, 13).into_text_style(root),
            (10, 32),
        )
        .map_err(draw_err)?;

        // Integer cell coordinates: head h spans x in [h, h+1], layer l spans y in [l, l+1] with
        // layer 0 on top. Labels sit on cell edges, shifted by half a cell onto the centres.
        let (nh_i, nl_i) = (nh as i32, nl as i32);
        let mut chart = ChartBuilder::on(&main)
            .margin_top(lay.top)
            .margin_bottom(10)
            .margin_left(8)
            .margin_right(20)
            .x_label_area_size(lay.bottom - 10)
            .y_label_area_size(lay.left)
            .build_cartesian_2d(0..nh_i, nl_i..0)
            .map_err(draw_err)?;
        let x_fmt = |v: &i32| {
            if *v < nh_i {
                v.to_string()
            } else {
                String::new()
            }
        };
        let y_fmt = |v: &i32| {
            if *v < nl_i {
                v.to_string()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(label_count(nh, lay.cell_w, 22))
            .y_labels(label_count(nl, lay.cell_h, 14))
            .x_label_offset(lay.cell_w as i32 / 2)
            .y_label_offset(lay.cell_h as i32 / 2)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(format!("query head ({n_kv} KV groups of {gs} heads)"))
            .y_desc("layer")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;

        let cells = grid.values.iter().enumerate().flat_map(|(l, hs)| {
            hs.iter()
                .enumerate()
                .map(move |(h, &v)| (l as i32, h as i32, v))
        });
        chart
            .draw_series(
                cells
                    .clone()
                    .map(|(l, h, r)| Rectangle::new([(h, l), (h + 1, l + 1)], viridis(r).filled())),
            )
            .map_err(draw_err)?;
        if lay.cell_w >= 34 && lay.cell_h >= 14 {
            let font_px = (lay.cell_h as f64 * 0.55).clamp(9.0, 13.0);
            let (dx, dy) = (lay.cell_w as i32 / 2, lay.cell_h as i32 / 2);
            chart
                .draw_series(cells.map(|(l, h, r)| {
                    let colour: &'static RGBColor = if r < 0.6 { &WHITE } else { &BLACK };
                    let style = TextStyle::from((FONT, font_px).into_font())
                        .color(colour)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    EmptyElement::at((h, l)) + Text::new(format!("{r:.2}"), (dx, dy), style)
                }))
                .map_err(draw_err)?;
        }
        // KV group boundaries.
        chart
            .draw_series((1..n_kv).map(|g| {
                let x = (g * gs) as i32;
                PathElement::new(vec![(x, 0), (x, nl_i)], WHITE.stroke_width(3))
            }))
            .map_err(draw_err)?;
        if let Some(p) = plan {
            let frames = p.layers.iter().flat_map(|lp| {
                lp.mamba_groups.iter().map(move |&g| {
                    let (x0, x1) = ((g * gs) as i32, ((g + 1) * gs) as i32);
                    let (y0, y1) = (lp.layer as i32, lp.layer as i32 + 1);
                    PathElement::new(
                        vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)],
                        RED.stroke_width(2),
                    )
                })
            });
            chart.draw_series(frames).map_err(draw_err)?;
        }

        // Colour bar.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(lay.top)
            .margin_bottom(lay.bottom)
            .margin_right(50)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(draw_err)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style((FONT, 13))
            .draw()
            .map_err(draw_err)?;
        const STEPS: usize = 200;
        cb.draw_series((0..STEPS).map(|i| {
            let (a, b) = (i as f64 / STEPS as f64, (i + 1) as f64 / STEPS as f64);
            Rectangle::new([(0.0, a), (1.0, b)], viridis((a + b) / 2.0).filled())
        }))
        .map_err(draw_err)?;
        bar.draw_text(
            grid.bar_label,
            &(FONT, 14).into_text_style(&bar),
            (10, lay.top as i32 - 20),
        )
        .map_err(draw_err)?;
        Ok(())
    })
}

/// Per layer, every query head's recency score as a dot (coloured by KV group, spread sideways by
/// head) and each group's mean as a bar: layers with local heads stand out as dots near 1.
/// Written atomically to `path` as PNG of [`distribution_size`].
pub fn recency_distribution(report: &RecencyReport, path: &Path) -> Result<()> {
    check_report(report)?;
    let size = distribution_size(report);
    let (nh, nl, n_kv) = (
        report.num_attention_heads,
        report.num_layers,
        report.num_key_value_heads,
    );
    let gs = nh / n_kv;
    // Heads of a layer spread over [l - 0.35, l + 0.35].
    let spread = 0.7;
    let head_x = move |l: usize, h: usize| {
        l as f64
            + if nh > 1 {
                (h as f64 / (nh - 1) as f64 - 0.5) * spread
            } else {
                0.0
            }
    };
    render_png(path, size, |root| {
        let layer_px = (size.0 - 250) / nl.max(1) as u32;
        // Only whole layers are labelled (plotters picks round steps for f64 axes).
        let x_fmt = |v: &f64| {
            if (v - v.round()).abs() < 1e-6 && *v >= 0.0 {
                format!("{}", v.round() as usize)
            } else {
                String::new()
            }
        };
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "Recency score per layer, window w = {} - {}",
                    report.window, report.model
                ),
                (FONT, 16),
            )
            .margin(12)
            .margin_right(165)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.6f64..nl as f64 - 0.4, 0f64..1.02f64)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .x_desc("layer")
            .y_desc(format!(
                "recency score (mass on last {} keys)",
                report.window
            ))
            .x_labels(label_count(nl, layer_px, 24))
            .x_label_formatter(&x_fmt)
            .y_labels(11)
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;
        for g in 0..n_kv {
            let colour = Palette99::pick(g).to_rgba();
            let dots = report.layers.iter().flat_map(move |l| {
                l.heads
                    .iter()
                    .filter(move |h| h.head / gs == g)
                    .map(move |h| {
                        Circle::new((head_x(l.layer, h.head), h.recency), 3, colour.filled())
                    })
            });
            chart.draw_series(dots).map_err(draw_err)?;
            let means = report.layers.iter().map(move |l| {
                let (x0, x1) = (head_x(l.layer, g * gs), head_x(l.layer, (g + 1) * gs - 1));
                let m = l.groups[g].mean_recency;
                PathElement::new(vec![(x0 - 0.04, m), (x1 + 0.04, m)], colour.stroke_width(3))
            });
            chart.draw_series(means).map_err(draw_err)?;
        }
        // Legend in the right margin, outside the data.
        let (lx, ly) = (size.0 as i32 - 150, 60);
        let text = (FONT, 12).into_text_style(root);
        for g in 0..n_kv.min(24) {
            let colour = Palette99::pick(g).to_rgba();
            let y = ly + 18 * g as i32;
            root.draw(&Circle::new((lx + 6, y + 6), 4, colour.filled()))
                .map_err(draw_err)?;
            let label = format!("group {g} (heads {}-{})", g * gs, (g + 1) * gs - 1);
            root.draw_text(&label, &text, (lx + 16, y))
                .map_err(draw_err)?;
        }
        let y = ly + 18 * n_kv.min(24) as i32 + 8;
        root.draw_text("dot: query head", &text, (lx, y))
            .map_err(draw_err)?;
        root.draw_text("bar: group mean", &text, (lx, y + 18))
            .map_err(draw_err)?;
        Ok(())
    })
}
