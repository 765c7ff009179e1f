//! SVG charts of a drop run, one line per target: answers per second, and the p50
//! and p99 of reservation requests second by second. SVG needs no font or image
//! library, so the harness builds on a bare machine.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::TargetReport;

const SIZE: (u32, u32) = (960, 480);

fn colour(index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    PALETTE[index % PALETTE.len()]
}

/// Writes `<stem>-throughput.svg` and `<stem>-latency.svg`; returns their paths.
pub fn write(targets: &[TargetReport], stem: &Path) -> Result<Vec<PathBuf>> {
    let beside = |suffix: &str| {
        let name = stem.file_name().and_then(|s| s.to_str()).unwrap_or("drop");
        stem.with_file_name(format!("{name}-{suffix}.svg"))
    };
    let (throughput, latency) = (beside("throughput"), beside("latency"));
    throughput_chart(targets, &throughput).map_err(|e| anyhow!("throughput chart: {e}"))?;
    latency_chart(targets, &latency).map_err(|e| anyhow!("latency chart: {e}"))?;
    Ok(vec![throughput, latency])
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The x axis of both charts: the longest target's timeline, at least one second.
fn run_seconds(targets: &[TargetReport]) -> usize {
    targets
        .iter()
        .map(|t| t.timeline.len())
        .max()
        .unwrap_or(1)
        .max(1)
}

fn throughput_chart(targets: &[TargetReport], path: &Path) -> DrawResult {
    let seconds = run_seconds(targets);
    let peak = targets
        .iter()
        .flat_map(|t| t.timeline.iter().map(|s| s.answers))
        .max()
        .unwrap_or(1)
        .max(1);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("answers per second", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0..seconds, 0..(peak + peak / 10))?;
    chart
        .configure_mesh()
        .x_desc("second of the run")
        .y_desc("answers/s")
        .draw()?;
    for (i, target) in targets.iter().enumerate() {
        let style = colour(i);
        chart
            .draw_series(LineSeries::new(
                target.timeline.iter().map(|s| (s.second, s.answers)),
                style.stroke_width(2),
            ))?
            .label(target.target.name.clone())
            .legend(move |(x, y)| legend_mark(x, y, style));
    }
    finish(&mut chart, &root)
}

fn latency_chart(targets: &[TargetReport], path: &Path) -> DrawResult {
    let seconds = run_seconds(targets);
    let worst_ms = targets
        .iter()
        .flat_map(|t| t.timeline.iter().map(|s| s.reserve_p99_us))
        .max()
        .unwrap_or(1000) as f64
        / 1000.0;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "reservation latency per second (p50 solid, p99 dashed)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0..seconds, (0.01f64..(worst_ms * 2.0).max(1.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("second of the run")
        .y_desc("ms (log)")
        .draw()?;
    for (i, target) in targets.iter().enumerate() {
        let style = colour(i);
        let busy = || target.timeline.iter().filter(|s| s.reserve_p50_us > 0);
        chart
            .draw_series(LineSeries::new(
                busy().map(|s| (s.second, s.reserve_p50_us as f64 / 1000.0)),
                style.stroke_width(2),
            ))?
            .label(target.target.name.clone())
            .legend(move |(x, y)| legend_mark(x, y, style));
        chart.draw_series(DashedLineSeries::new(
            busy().map(|s| (s.second, s.reserve_p99_us as f64 / 1000.0)),
            6,
            4,
            style.stroke_width(1),
        ))?;
    }
    finish(&mut chart, &root)
}

/// The legend's sample of a target's line.
fn legend_mark(x: i32, y: i32, style: RGBColor) -> PathElement<(i32, i32)> {
    PathElement::new([(x, y), (x + 16, y)], style.stroke_width(2))
}

/// Draws the legend (one entry per target) and writes the file.
fn finish<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
) -> DrawResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
