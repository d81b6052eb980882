//! What every figure shares: the font, rendering into an RGB buffer and writing it as PNG
//! atomically, the viridis colour map, and label helpers.

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
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
    crate::formats::io::write_atomic(path, &png_bytes)
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

/// `s` cut to its last `max_chars` characters (model paths are long; their end says most).
pub(crate) fn keep_tail(s: &str, max_chars: usize) -> String {
    let n = s.chars().count();
    if n <= max_chars || max_chars < 4 {
        return s.to_string();
    }
    let tail: String = s.chars().skip(n - (max_chars - 3)).collect();
    format!("...{tail}")
}

/// How many labels to ask for on an axis of `n` cells of `cell_px` pixels, so that labels sit at
/// least `min_px` apart (plotters then picks a round step).
pub(crate) fn label_count(n: usize, cell_px: u32, min_px: u32) -> usize {
    let fit = (n as u32 * cell_px / min_px.max(1)) as usize;
    fit.clamp(2, n + 1)
}
