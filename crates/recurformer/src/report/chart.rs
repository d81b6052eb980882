//! Line charts (`eval`, `bench`, the demo report): series against a linear or log axis.

use crate::report::render::{draw_err, render_png, FONT};
use anyhow::{bail, Result};
use plotters::prelude::*;
use std::path::Path;

/// One line of a [`line_chart`]: a name for the legend and (x, y) points in x order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (measured values) as well as the line.
    pub markers: bool,
}

/// Axes and title of a [`line_chart`].
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// Logarithmic x axis (base 2 tick labels suit context lengths).
    pub log_x: bool,
    pub log_y: bool,
    pub x_fmt: &'a dyn Fn(f64) -> String,
    pub y_fmt: &'a dyn Fn(f64) -> String,
}

/// Pixel size of every [`line_chart`] PNG.
pub const LINE_CHART_SIZE: (u32, u32) = (760, 460);

/// Colours of successive series (matplotlib's tab10 start).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A line chart of `series` (one colour each, legend at the upper left), written atomically to
/// `path` as a PNG of [`LINE_CHART_SIZE`]. Log axes need positive values.
pub fn line_chart(chart: &LineChart, series: &[Series], path: &Path) -> Result<()> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if pts.is_empty() {
        bail!("{}: no points to plot", chart.title);
    }
    if pts.iter().any(|p| !p.0.is_finite() || !p.1.is_finite()) {
        bail!("{}: a point is not finite", chart.title);
    }
    if (chart.log_x && pts.iter().any(|p| p.0 <= 0.0))
        || (chart.log_y && pts.iter().any(|p| p.1 <= 0.0))
    {
        bail!("{}: a logarithmic axis needs positive values", chart.title);
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        pts.iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)))
    };
    let (x0, x1) = fold(|p| p.0);
    let (y0, y1) = fold(|p| p.1);
    // Padded ranges: multiplicative on log axes, additive otherwise; y starts at 0 on linear axes.
    let (x0, x1) = if chart.log_x {
        (x0 / 1.15, x1 * 1.15)
    } else {
        (x0, x1.max(x0 + 1e-9))
    };
    let (y0, y1) = if chart.log_y {
        (y0 / 1.3, y1 * 1.3)
    } else {
        (0f64.min(y0), y1 + (y1 - 0f64.min(y0)).max(1e-9) * 0.1)
    };
    render_png(path, LINE_CHART_SIZE, |root| {
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(chart.title, (FONT, 18))
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(80);
        macro_rules! draw {
            ($c:expr) => {{
                let mut c = $c;
                c.configure_mesh()
                    .x_desc(chart.x_desc)
                    .y_desc(chart.y_desc)
                    .label_style((FONT, 13))
                    .axis_desc_style((FONT, 15))
                    .x_label_formatter(&|v| (chart.x_fmt)(*v))
                    .y_label_formatter(&|v| (chart.y_fmt)(*v))
                    .draw()
                    .map_err(draw_err)?;
                for (i, s) in series.iter().enumerate() {
                    let col = PALETTE[i % PALETTE.len()];
                    c.draw_series(std::iter::once(PathElement::new(
                        s.points.clone(),
                        col.stroke_width(2),
                    )))
                    .map_err(draw_err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                    });
                    if s.markers {
                        c.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, col.filled())))
                            .map_err(draw_err)?;
                    }
                }
                c.configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .label_font((FONT, 13))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(draw_err)?;
            }};
        }
        match (chart.log_x, chart.log_y) {
            (true, true) => draw!(builder
                .build_cartesian_2d((x0..x1).log_scale().base(2.0), (y0..y1).log_scale())
                .map_err(draw_err)?),
            (true, false) => draw!(builder
                .build_cartesian_2d((x0..x1).log_scale().base(2.0), y0..y1)
                .map_err(draw_err)?),
            (false, true) => draw!(builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(draw_err)?),
            (false, false) => draw!(builder
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_err)?),
        }
        Ok(())
    })
}
