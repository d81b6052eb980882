//! Tests of the figures: sizes, axis kinds, refusals.

use crate::convert::recency::RecencyReport;
use crate::convert::recency::{group_stats, Calibration, HeadStats, LayerStats};
use crate::model::plan::Plan;
use crate::report::*;
use plotters::prelude::RGBColor;
use std::path::Path;

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
        probes: None,
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
