//! PNG figures of a recency analysis: a layers x query-heads heatmap of the recency score and a
//! per-layer plot of the score distribution, so a person sees at a glance which heads are local.
//!
//! Rendering: `plotters`' bitmap backend draws into an RGB buffer, the `png` crate encodes it, and
//! [`crate::io::write_atomic`] writes it, so a figure is never left half-written. Text goes through
//! `ab_glyph` (pure Rust) with a TrueType font read from the system at first use: set
//! `RECURFORMER_FONT=/path/to/font.ttf` to choose one; otherwise common DejaVu / Liberation / Noto /
//! FreeFont paths are tried (Debian: `apt-get install fonts-dejavu-core`).

use crate::plan::{Plan, PlanShape};
use crate::recency::RecencyReport;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::OnceLock;

/// Font family name the figures use (registered by [`ensure_font`]).
pub(crate) const FONT: &str = "sans-serif";

/// Font files tried in order when `RECURFORMER_FONT` is not set.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font under [`FONT`] once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates: Vec<String> = match std::env::var("RECURFORMER_FONT") {
                Ok(p) if !p.is_empty() => vec![p],
                _ => FONT_CANDIDATES.iter().map(|s| s.to_string()).collect(),
            };
            for p in &candidates {
                if let Ok(bytes) = std::fs::read(p) {
                    // plotters keeps fonts for the life of the process; leak once.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(format!(
                "no usable TrueType font for figure text: tried {} (set RECURFORMER_FONT to a \
                 .ttf file, or install fonts-dejavu-core)",
                candidates.join(", ")
            ))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Turns a plotters error (whose types are not `Send + Sync + 'static`) into an anyhow error.
pub(crate) fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Renders `size` pixels with `draw`, encodes a PNG, writes it atomically to `path`.
pub(crate) fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    ensure_font()?;
    let (w, h) = size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root).with_context(|| format!("drawing {}", path.display()))?;
        root.present().map_err(draw_err)?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .and_then(|mut wr| wr.write_image_data(&rgb))
            .with_context(|| format!("encoding {}", path.display()))?;
    }
    crate::io::write_atomic(path, &png_bytes)
}

/// Viridis (matplotlib's default colormap: perceptually uniform, readable in grey) at 9 stops,
/// linearly interpolated. `v` is clamped to [0, 1].
pub fn viridis(v: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = v * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let t = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

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
    fn new(report: &RecencyReport) -> Self {
        let nh = report.num_attention_heads.max(1) as u32;
        let nl = report.num_layers.max(1) as u32;
        HeatmapLayout {
            cell_w: (720 / nh).clamp(10, 64),
            cell_h: (720 / nl).clamp(8, 28),
            left: 80,
            top: 64,
            bottom: 70,
            bar: 130,
        }
    }

    fn size(&self, report: &RecencyReport) -> (u32, u32) {
        let nh = report.num_attention_heads as u32;
        let nl = report.num_layers as u32;
        (
            (self.left + 8 + nh * self.cell_w + 20 + self.bar).max(560),
            self.top + nl * self.cell_h + self.bottom,
        )
    }
}

/// Pixel size of the PNG [`recency_heatmap`] writes for `report`.
pub fn heatmap_size(report: &RecencyReport) -> (u32, u32) {
    HeatmapLayout::new(report).size(report)
}

/// Pixel size of the PNG [`recency_distribution`] writes for `report`.
pub fn distribution_size(report: &RecencyReport) -> (u32, u32) {
    let nl = report.num_layers.max(1) as u32;
    // 36 px per layer for up to ~40 layers, narrower beyond so the figure stays under ~2000 px.
    let layer_px = (1600 / nl).clamp(12, 36);
    ((250 + layer_px * nl).max(760), 560)
}

/// `s` cut to its last `max_chars` characters (model paths are long; their end says most).
fn keep_tail(s: &str, max_chars: usize) -> String {
    let n = s.chars().count();
    if n <= max_chars || max_chars < 4 {
        return s.to_string();
    }
    let tail: String = s.chars().skip(n - (max_chars - 3)).collect();
    format!("...{tail}")
}

fn check_report(report: &RecencyReport) -> Result<()> {
    report.validate().context("recency report")?;
    if report.num_layers == 0 {
        bail!("recency report has no layers: nothing to plot");
    }
    Ok(())
}

/// How many labels to ask for on an axis of `n` cells of `cell_px` pixels, so that labels sit at
/// least `min_px` apart (plotters then picks a round step).
fn label_count(n: usize, cell_px: u32, min_px: u32) -> usize {
    let fit = (n as u32 * cell_px / min_px.max(1)) as usize;
    fit.clamp(2, n + 1)
}

/// Heatmap of recency scores: layers (y, layer 0 on top) x query heads (x), viridis colour with a
/// colour bar, KV group boundaries as thick white separators, the score printed in each cell when
/// it fits. Written atomically to `path` as PNG of [`heatmap_size`].
pub fn recency_heatmap(report: &RecencyReport, path: &Path) -> Result<()> {
    heatmap(report, None, path)
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
    heatmap(report, Some(plan), path)
}

fn heatmap(report: &RecencyReport, plan: Option<&Plan>, path: &Path) -> Result<()> {
    check_report(report)?;
    let lay = HeatmapLayout::new(report);
    let size = lay.size(report);
    let (nh, nl) = (report.num_attention_heads, report.num_layers);
    let gs = nh / report.num_key_value_heads;
    render_png(path, size, |root| {
        let (main, bar) = root.split_horizontally(size.0 - lay.bar);
        root.draw_text(
            &format!("Recency score R(l,h), window w = {}", report.window),
            &(FONT, 17).into_text_style(root),
            (10, 8),
        )
        .map_err(draw_err)?;
        let mut subtitle = report.model.clone();
        if let Some(p) = plan {
            subtitle.push_str(&format!(
                "; red frames: {} of {} KV groups replaced by Mamba",
                p.replaced_groups(),
                nl * report.num_key_value_heads
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
            .x_desc(format!(
                "query head ({} KV groups of {gs} heads)",
                report.num_key_value_heads
            ))
            .y_desc("layer")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;

        let cells = report.layers.iter().flat_map(|l| {
            l.heads
                .iter()
                .map(move |h| (l.layer as i32, h.head as i32, h.recency))
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
            .draw_series((1..report.num_key_value_heads).map(|g| {
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
            "recency",
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

/// Pixel size of the PNG [`needle_heatmap`] writes for `results`: 96 x 40 px per cell.
pub fn needle_heatmap_size(results: &crate::tasks::NeedleResults) -> (u32, u32) {
    let nd = results.depths.len().max(1) as u32;
    let nc = results.contexts.len().max(1) as u32;
    ((90 + 8 + nd * 96 + 20 + 130).max(560), 70 + nc * 40 + 70)
}

/// Needle-in-a-haystack accuracy: context length (y, shortest on top) x needle depth (x), viridis
/// colour with a colour bar, the accuracy written in each cell (cells with no cases are grey).
/// Written atomically to `path` as PNG of [`needle_heatmap_size`].
pub fn needle_heatmap(
    results: &crate::tasks::NeedleResults,
    model_name: &str,
    path: &Path,
) -> Result<()> {
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
            "{model_name}; {} sample(s) per cell, greedy, {}",
            results.samples,
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

        let cells: Vec<(i32, i32, Option<&crate::tasks::NeedleCell>)> = (0..nc)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recency::{group_stats, Calibration, HeadStats, LayerStats};

    /// Pseudo-random recency scores for `nl` layers, `nh` query heads over `n_kv` KV groups.
    fn synthetic_shape(nl: usize, nh: usize, n_kv: usize) -> RecencyReport {
        let layers = (0..nl)
            .map(|l| {
                let heads: Vec<HeadStats> = (0..nh)
                    .map(|h| HeadStats {
                        head: h,
                        recency: ((l * nh + h) as f64 * 0.37).fract(),
                        sink: 0.1,
                        distance: 10.0,
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
            model: "synthetic-model".into(),
            num_layers: nl,
            num_attention_heads: nh,
            num_key_value_heads: n_kv,
            head_dim: 8,
            window: 32,
            sink_tokens: 4,
            calibration: Calibration::default(),
            layers,
        }
    }

    fn synthetic() -> RecencyReport {
        synthetic_shape(6, 6, 3)
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(
            &b[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is not a PNG",
            path.display()
        );
        assert_eq!(&b[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (be(16), be(20))
    }

    #[test]
    fn figures_are_pngs_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic();

        let heat = dir.path().join("heatmap.png");
        recency_heatmap(&r, &heat).unwrap();
        assert_eq!(png_size(&heat), heatmap_size(&r));

        let plan = Plan::by_fraction(&r, 0.5, 1).unwrap();
        let framed = dir.path().join("heatmap_plan.png");
        recency_heatmap_with_plan(&r, &plan, &framed).unwrap();
        assert_eq!(png_size(&framed), heatmap_size(&r));
        // The frames change pixels.
        assert_ne!(
            std::fs::read(&heat).unwrap(),
            std::fs::read(&framed).unwrap()
        );

        let dist = dir.path().join("distribution.png");
        recency_distribution(&r, &dist).unwrap();
        assert_eq!(png_size(&dist), distribution_size(&r));

        // The default model's shape (30 layers, 9 query heads over 3 KV groups).
        let smol = synthetic_shape(30, 9, 3);
        let smol_heat = dir.path().join("smol_heatmap.png");
        let smol_plan = Plan::by_fraction(&smol, 0.5, 1).unwrap();
        recency_heatmap_with_plan(&smol, &smol_plan, &smol_heat).unwrap();
        assert_eq!(png_size(&smol_heat), heatmap_size(&smol));
        let smol_dist = dir.path().join("smol_distribution.png");
        recency_distribution(&smol, &smol_dist).unwrap();
        assert_eq!(png_size(&smol_dist), distribution_size(&smol));

        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
        // Set RECURFORMER_KEEP_FIGURES=DIR to look at the figures.
        if let Ok(keep) = std::env::var("RECURFORMER_KEEP_FIGURES") {
            for n in &names {
                std::fs::copy(dir.path().join(n), Path::new(&keep).join(n)).unwrap();
            }
        }
    }

    #[test]
    fn line_charts_render_every_axis_kind_and_refuse_bad_points() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series {
                name: "base".into(),
                points: vec![(1024.0, 23.1), (4096.0, 18.4), (8192.0, 13.5)],
                markers: true,
            },
            Series {
                name: "50 %".into(),
                points: vec![(1024.0, 27.6), (4096.0, 19.4), (8192.0, 17.9)],
                markers: false,
            },
        ];
        let fmt = |v: f64| format!("{v:.0}");
        let mut pngs = Vec::new();
        for (log_x, log_y) in [(false, false), (true, false), (false, true), (true, true)] {
            let chart = LineChart {
                title: "t",
                x_desc: "x",
                y_desc: "y",
                log_x,
                log_y,
                x_fmt: &fmt,
                y_fmt: &fmt,
            };
            let path = dir.path().join(format!("c_{log_x}_{log_y}.png"));
            line_chart(&chart, &series, &path).unwrap();
            assert_eq!(png_size(&path), LINE_CHART_SIZE);
            pngs.push(std::fs::read(&path).unwrap());
        }
        // Axis kinds change the picture.
        assert_ne!(pngs[0], pngs[1]);
        assert_ne!(pngs[1], pngs[3]);
        let chart = LineChart {
            title: "bad",
            x_desc: "x",
            y_desc: "y",
            log_x: false,
            log_y: true,
            x_fmt: &fmt,
            y_fmt: &fmt,
        };
        let zero = vec![Series {
            name: "z".into(),
            points: vec![(1.0, 0.0)],
            markers: true,
        }];
        let e = line_chart(&chart, &zero, &dir.path().join("z.png")).unwrap_err();
        assert!(e.to_string().contains("positive"), "{e}");
        let nan = vec![Series {
            name: "n".into(),
            points: vec![(1.0, f64::NAN)],
            markers: true,
        }];
        let e = line_chart(&chart, &nan, &dir.path().join("n.png")).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
        let e = line_chart(&chart, &[], &dir.path().join("e.png")).unwrap_err();
        assert!(e.to_string().contains("no points"), "{e}");
        assert!(!dir.path().join("z.png").exists());
    }

    #[test]
    fn plan_of_another_shape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic();
        let mut other = r.clone();
        other.num_layers = 5;
        other.layers.pop();
        let plan = Plan::by_threshold(&other, 0.5, 0).unwrap();
        let e = recency_heatmap_with_plan(&r, &plan, &dir.path().join("x.png")).unwrap_err();
        assert!(format!("{e:#}").contains("num_layers: 5"), "{e:#}");
    }

    #[test]
    fn viridis_ends() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(2.0), viridis(1.0));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
    }
}
