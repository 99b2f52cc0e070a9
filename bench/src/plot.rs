//! PNG plots of the results (plotters, with a font file from the system: DejaVu Sans).
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::stats::Summary;

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT_PATH).with_context(|| format!("reading {FONT_PATH} (Debian: fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{FONT_PATH} is not a usable font"))
}

/// One line per series over a logarithmic x axis (number of services), with min-max bars.
pub fn lines(path: &Path, title: &str, y_label: &str, series: &[(String, Vec<(usize, Summary)>)], log_y: bool) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|(n, _)| *n as f64)).collect();
    let ys: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().flat_map(|(_, s)| [s.min, s.max])).collect();
    let (x_lo, x_hi) = (xs.iter().cloned().fold(f64::MAX, f64::min).max(1.0), xs.iter().cloned().fold(1.0, f64::max) * 1.5);
    let y_hi = ys.iter().cloned().fold(0.0, f64::max) * 1.15;
    let y_lo = if log_y { ys.iter().cloned().filter(|v| *v > 0.0).fold(f64::MAX, f64::min) / 1.5 } else { 0.0 };
    let mut builder = ChartBuilder::on(&root);
    let chart = builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(44).y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc("configured services").y_desc(y_label).label_style(("sans-serif", 14)).draw()?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(points.iter().map(|(n, s)| (*n as f64, s.median)), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart.draw_series(points.iter().map(|(n, s)| Circle::new((*n as f64, s.median), 4, color.filled())))?;
                chart.draw_series(points.iter().map(|(n, s)| PathElement::new(vec![(*n as f64, s.min), (*n as f64, s.max)], color.stroke_width(1))))?;
            }
            chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).label_font(("sans-serif", 14)).draw()?;
        }};
    }
    if log_y {
        draw!(chart.build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?);
    } else {
        draw!(chart.build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)?);
    }
    root.present()?;
    Ok(())
}
