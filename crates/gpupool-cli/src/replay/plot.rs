//! The memory timeline of a replay as an SVG picture: requested-live, in-use and reserved
//! bytes against the event index.
//!
//! Drawn with `plotters` through its SVG backend only (no bitmap or font-file dependencies: the
//! text is SVG `<text>`, rendered by the viewer with its own fonts). The y axis uses the one
//! binary unit (KiB, MiB or GiB) that suits the largest value, and the x axis counts events
//! with thousands separators. A point holds the highest values of the N events before it (the
//! replay computes them; see `replay::Timeline`), plus the first and the last event.
#![forbid(unsafe_code)]

use std::path::Path;

use plotters::prelude::*;

use crate::format::thousands;

/// One point of the timeline: the highest values of an interval of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Events replayed so far.
    pub event: u64,
    /// Bytes the owners of live buffers asked for.
    pub requested_live_bytes: u64,
    /// Block bytes of live buffers.
    pub in_use_bytes: u64,
    /// Everything held from the backend.
    pub reserved_bytes: u64,
}

/// The unit that suits `max_bytes`, and its size.
fn unit_for(max_bytes: u64) -> (&'static str, f64) {
    match max_bytes {
        bytes if bytes >= 1 << 30 => ("GiB", (1u64 << 30) as f64),
        bytes if bytes >= 1 << 20 => ("MiB", (1u64 << 20) as f64),
        _ => ("KiB", 1024.0),
    }
}

/// Draws `samples` into an SVG file at `path`.
pub fn write_svg(path: &Path, title: &str, every: usize, samples: &[Sample]) -> Result<(), String> {
    let fail = |error: &dyn std::fmt::Display| format!("cannot draw {}: {error}", path.display());
    let max_bytes = samples
        .iter()
        .map(|sample| sample.reserved_bytes.max(sample.requested_live_bytes))
        .max()
        .unwrap_or(0);
    let (unit, scale) = unit_for(max_bytes);
    // Headroom above the highest line keeps the legend (upper left) clear of every line.
    let y_max = (max_bytes as f64 / scale * 1.3).max(1.0);
    let x_max = samples.last().map_or(1, |sample| sample.event.max(1));

    let root = SVGBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0..x_max, 0.0..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "event index (each point: the highest value of its {} events)",
            thousands(every as u64)
        ))
        .y_desc(format!("bytes ({unit})"))
        .x_label_formatter(&|event| thousands(*event))
        .y_label_formatter(&|value| format!("{value:.1} {unit}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 20))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(|e| fail(&e))?;

    type Series = (&'static str, RGBColor, fn(&Sample) -> u64);
    let series: [Series; 3] = [
        (
            "reserved (held from the backend)",
            RGBColor(214, 39, 40),
            |s| s.reserved_bytes,
        ),
        (
            "in use (blocks of live buffers)",
            RGBColor(255, 127, 14),
            |s| s.in_use_bytes,
        ),
        ("requested live (the trace)", RGBColor(31, 119, 180), |s| {
            s.requested_live_bytes
        }),
    ];
    for (label, color, value) in series {
        let points = samples
            .iter()
            .map(|sample| (sample.event, value(sample) as f64 / scale));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_largest_value() {
        assert_eq!(unit_for(0).0, "KiB");
        assert_eq!(unit_for(5 << 20).0, "MiB");
        assert_eq!(unit_for(8 << 30).0, "GiB");
        assert_eq!(thousands(42_431), "42,431");
    }
}
