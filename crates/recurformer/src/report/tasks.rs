//! Figures of the retrieval tasks (`eval --tasks needle`): accuracy by context length and depth.

use crate::eval::tasks::NeedleResults;
use crate::report::render::{draw_err, keep_tail, render_png, viridis, FONT};
use anyhow::{bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Pixel size of the PNG [`needle_heatmap`] writes for `results`: 96 x 40 px per cell.
pub fn needle_heatmap_size(results: &NeedleResults) -> (u32, u32) {
    let nd = results.depths.len().max(1) as u32;
    let nc = results.contexts.len().max(1) as u32;
    ((90 + 8 + nd * 96 + 20 + 130).max(560), 70 + nc * 40 + 70)
}

/// Needle-in-a-haystack accuracy: context length (y, shortest on top) x needle depth (x), viridis
/// colour with a colour bar, the accuracy written in each cell (cells with no cases are grey).
/// Written atomically to `path` as PNG of [`needle_heatmap_size`].
pub fn needle_heatmap(results: &NeedleResults, model_name: &str, path: &Path) -> Result<()> {
    let (nd, nc) = (results.depths.len(), results.contexts.len());
    if nd == 0 || nc == 0 {
        bail!("needle results have {nc} context(s) x {nd} depth(s): nothing to plot");
    }
    let size = needle_heatmap_size(results);
    let (cell_w, cell_h, left, top, bottom, bar) = (96u32, 40u32, 90u32, 70u32, 70u32, 130u32);
    render_png(path, size, |root| {
        let (main, bar_area) = root.split_horizontally(size.0 - bar);
        root.draw_text(
            &format!(
                "Needle in a haystack: retrieval accuracy ({:.0}% overall)",
                100.0 * results.accuracy
            ),
            &(FONT, 17).into_text_style(root),
            (10, 8),
        )
        .map_err(draw_err)?;
        let subtitle = format!(
            "{model_name}; {} sample(s) per cell, {}, {}",
            results.samples,
            match results.scoring {
                crate::eval::tasks::Scoring::TeacherForced => "teacher-forced greedy match",
                crate::eval::tasks::Scoring::Generate => "greedy generation",
            },
            if results.chat {
                "chat template"
            } else {
                "plain prompt"
            }
        );
        root.draw_text(
            &keep_tail(&subtitle, (size.0 as usize - 20) / 7),
            &(FONT, 13).into_text_style(root),
            (10, 32),
        )
        .map_err(draw_err)?;

        // Integer cell coordinates as in the recency heatmap: depth d spans x in [d, d+1], context
        // c spans y in [c, c+1] with the first context on top.
        let (nd_i, nc_i) = (nd as i32, nc as i32);
        let mut chart = ChartBuilder::on(&main)
            .margin_top(top)
            .margin_bottom(10)
            .margin_left(8)
            .margin_right(20)
            .x_label_area_size(bottom - 10)
            .y_label_area_size(left)
            .build_cartesian_2d(0..nd_i, nc_i..0)
            .map_err(draw_err)?;
        let x_fmt = |v: &i32| match results.depths.get(*v as usize) {
            Some(d) if *v >= 0 => format!("{:.0}%", 100.0 * d),
            _ => String::new(),
        };
        let y_fmt = |v: &i32| match results.contexts.get(*v as usize) {
            Some(c) if *v >= 0 => c.to_string(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nd + 1)
            .y_labels(nc + 1)
            .x_label_offset(cell_w as i32 / 2)
            .y_label_offset(cell_h as i32 / 2)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc("needle depth (share of the haystack before the needle)")
            .y_desc("context (tokens)")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;

        let cells: Vec<(i32, i32, Option<&crate::eval::tasks::NeedleCell>)> = (0..nc)
            .flat_map(|c| (0..nd).map(move |d| (c, d)))
            .map(|(c, d)| {
                let cell = results.cell(results.contexts[c], results.depths[d]);
                (c as i32, d as i32, cell.filter(|x| x.samples > 0))
            })
            .collect();
        chart
            .draw_series(cells.iter().map(|&(c, d, cell)| {
                let colour = cell.map_or(RGBColor(200, 200, 200), |x| viridis(x.accuracy));
                Rectangle::new([(d, c), (d + 1, c + 1)], colour.filled())
            }))
            .map_err(draw_err)?;
        // Thin white grid so neighbouring cells of equal colour stay apart.
        chart
            .draw_series(
                cells.iter().map(|&(c, d, _)| {
                    Rectangle::new([(d, c), (d + 1, c + 1)], WHITE.stroke_width(1))
                }),
            )
            .map_err(draw_err)?;
        let (dx, dy) = (cell_w as i32 / 2, cell_h as i32 / 2);
        chart
            .draw_series(cells.iter().map(|&(c, d, cell)| {
                let (label, colour): (String, &'static RGBColor) = match cell {
                    Some(x) => (
                        if results.samples > 1 {
                            format!("{:.0}% ({}/{})", 100.0 * x.accuracy, x.correct, x.samples)
                        } else {
                            format!("{:.0}%", 100.0 * x.accuracy)
                        },
                        if x.accuracy < 0.6 { &WHITE } else { &BLACK },
                    ),
                    None => ("n/a".to_string(), &BLACK),
                };
                let style = TextStyle::from((FONT, 13).into_font())
                    .color(colour)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                EmptyElement::at((d, c)) + Text::new(label, (dx, dy), style)
            }))
            .map_err(draw_err)?;

        // Colour bar.
        let mut cb = ChartBuilder::on(&bar_area)
            .margin_top(top)
            .margin_bottom(bottom)
            .margin_right(50)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(draw_err)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{:.0}%", 100.0 * v))
            .label_style((FONT, 13))
            .draw()
            .map_err(draw_err)?;
        const STEPS: usize = 200;
        cb.draw_series((0..STEPS).map(|i| {
            let (a, b) = (i as f64 / STEPS as f64, (i + 1) as f64 / STEPS as f64);
            Rectangle::new([(0.0, a), (1.0, b)], viridis((a + b) / 2.0).filled())
        }))
        .map_err(draw_err)?;
        bar_area
            .draw_text(
                "accuracy",
                &(FONT, 14).into_text_style(&bar_area),
                (10, top as i32 - 20),
            )
            .map_err(draw_err)?;
        Ok(())
    })
}
