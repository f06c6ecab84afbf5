//! SVG bar charts of the experiments' results.
//!
//! `plotters` with only its SVG backend: no font or bitmap dependencies
//! (text is left to the SVG viewer), and axes, ticks and labels come for
//! free, which hand-written SVG would have to re-implement.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::Error;

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// The bar's label, on the vertical axis.
    pub label: String,
    /// Its length.
    pub value: f64,
    /// Which series it belongs to (selects the colour).
    pub series: usize,
}

/// A horizontal bar chart: one bar per row, labels on the left.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// The title.
    pub title: String,
    /// What the values are, with their unit.
    pub x_desc: String,
    /// The bars, top to bottom.
    pub bars: Vec<Bar>,
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
];

/// Creates `dir` if needed and checks that files can be written in it.
pub fn check_dir(dir: &Path) -> Result<(), Error> {
    let fail = |reason: String| Error::Chart {
        path: dir.to_path_buf(),
        reason,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(fail(
            "--out names a file; it must name a directory (made if missing)".to_owned(),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot make the chart directory (--out): {e}")))?;
    let probe = dir.join(".vmtask-write-check");
    let unwritable =
        |e: std::io::Error| fail(format!("the chart directory (--out) is not writable: {e}"));
    std::fs::write(&probe, b"").map_err(unwritable)?;
    std::fs::remove_file(&probe).map_err(unwritable)
}

impl BarChart {
    /// Writes the chart as `dir/name.svg`, creating `dir`; returns the path.
    pub fn write_svg(&self, dir: &Path, name: &str) -> Result<PathBuf, Error> {
        let path = dir.join(format!("{name}.svg"));
        let fail = |reason: String| Error::Chart {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        self.draw(&path).map_err(|e| fail(e.to_string()))?;
        Ok(path)
    }

    fn draw(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let n = self.bars.len().max(1) as u32;
        let max = self
            .bars
            .iter()
            .map(|bar| bar.value)
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let height = 120 + 48 * n;
        let root = SVGBackend::new(path, (960, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(330)
            .build_cartesian_2d(0.0..max * 1.18, (0..n).into_segmented())?;
        let labels: Vec<&str> = self.bars.iter().map(|bar| bar.label.as_str()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(self.x_desc.as_str())
            .y_labels(n as usize)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                    .get((n - 1).wrapping_sub(*i) as usize)
                    .copied()
                    .unwrap_or("")
                    .to_string(),
                SegmentValue::Last => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()?;
        // Segment 0 is at the bottom: the first bar goes in the top one.
        let row = |i: usize| n - 1 - i as u32;
        chart.draw_series(self.bars.iter().enumerate().map(|(i, bar)| {
            let i = row(i);
            let colour = COLOURS[bar.series % COLOURS.len()];
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (bar.value, SegmentValue::Exact(i + 1)),
                ],
                colour.filled(),
            );
            rect.set_margin(6, 6, 0, 0);
            rect
        }))?;
        chart.draw_series(self.bars.iter().enumerate().map(|(i, bar)| {
            Text::new(
                format_value(bar.value),
                (bar.value + max * 0.01, SegmentValue::CenterOf(row(i))),
                ("sans-serif", 14).into_font(),
            )
        }))?;
        root.present()?;
        Ok(())
    }
}

/// A value with three significant digits or so.
fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_an_svg_with_every_label() {
        let dir = std::env::temp_dir().join(format!("vmtask-chart-test-{}", std::process::id()));
        let chart = BarChart {
            title: "test".into(),
            x_desc: "ns".into(),
            bars: vec![
                Bar {
                    label: "alpha".into(),
                    value: 3.0,
                    series: 0,
                },
                Bar {
                    label: "beta".into(),
                    value: 1500.0,
                    series: 1,
                },
            ],
        };
        let path = chart.write_svg(&dir, "t").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(svg.contains("alpha") && svg.contains("beta") && svg.contains("1500"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
