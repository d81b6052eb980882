//! Figures of the reports (DESIGN.md, the `eval` arrow: "report ... + plots"): recency heatmaps and
//! distributions, head-probe heatmaps, the needle accuracy grid, line charts and the training loss curve, all PNG.
//!
//! Rendering: `plotters`' bitmap backend draws into an RGB buffer, the `png` crate encodes it, and
//! [`crate::formats::io::write_atomic`] writes it, so a figure is never left half-written. Text goes
//! through `ab_glyph` (pure Rust) with a TrueType font read from the system at first use: set
//! `RECURFORMER_FONT=/path/to/font.ttf` to choose one; otherwise common DejaVu / Liberation / Noto /
//! FreeFont paths are tried (Debian: `apt-get install fonts-dejavu-core`).

pub mod chart;
pub mod loss;
pub mod probes;
pub mod recency;
pub mod render;
pub mod tasks;
#[cfg(test)]
mod tests;

pub use chart::{line_chart, LineChart, Series, LINE_CHART_SIZE};
pub use loss::{loss_plot_size, plot_losses};
pub use probes::{probe_heatmap, probe_heatmap_size};
pub use recency::{
    distribution_size, heatmap_size, recency_distribution, recency_heatmap,
    recency_heatmap_with_plan,
};
pub use render::viridis;
pub use tasks::{needle_heatmap, needle_heatmap_size};
