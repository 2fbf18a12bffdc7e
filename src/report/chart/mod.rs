//! 报告图表：把一份完成的报告画成 SVG 折线图（`plotters`，只用 SVG 后端，不嵌字体），
//! 写在报告旁边（`<报告文件名主干>-<后缀>.svg`），并由 Markdown 报告引用。
//!
//! 只画报告里真实存在的测量值：缺数据就不出这张图，绝不补值或插值。
//!
//! - MLA（`kind = "mla"`）：容量探测的实测内存随序列长度变化（对数横轴），每个变体一条线，
//!   虚线为内存预算；
//! - MTP（`kind = "mtp"`）：扫描点（`series.mtp_sweep`）的加速比随草稿深度 D 变化，
//!   每个批大小一条线，虚线为 SC-002b 阈值；
//! - 任何带内存时间序列的报告：内存随时间变化，每个内存来源一条线。
//!
//! MLA 图的纵轴是"实测解码峰值 + 实测预填充工作区"，即运行器拿来与预算比较的量，
//! 所以折线穿过预算虚线的位置就是测得的容量。图中文字用英文：SVG 不嵌字体，
//! 查看的机器未必装有中文字体。

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::schema::Report;

/// 图的像素尺寸（宽、高）。
const SIZE: (u32, u32) = (900, 540);
/// 每 MiB 的字节数。
const MIB: f64 = 1024.0 * 1024.0;

/// 一条折线：图例名与数据点 `(x, y)`。
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// 图例中的名称（例如变体名）。
    pub name: String,
    /// 数据点；非有限值（NaN、无穷）在绘制时跳过。
    pub points: Vec<(f64, f64)>,
}

/// 一张折线图的完整描述。
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// 标题。
    pub title: String,
    /// 横轴说明（含单位）。
    pub x_label: String,
    /// 纵轴说明（含单位）。
    pub y_label: String,
    /// 折线，每条一种颜色，带点标记与图例。
    pub series: Vec<Series>,
    /// 水平虚线 `(图例名, y)`，例如内存预算或验收阈值；计入纵轴范围。
    pub hlines: Vec<(String, f64)>,
    /// 横轴是否用对数刻度（底 2，适合 1024..65536 这样的序列长度）；非正的 x 在对数轴上跳过。
    pub log_x: bool,
}

/// 把图表渲染为 SVG 文本。
///
/// 非有限的点被跳过；一个有限点都没有时返回 `Err`（不画空图）。
/// 绘图库内部的 panic 也转换为 `Err`，调用方不会因为一张图而丢掉报告。
pub fn render_svg(chart: &Chart) -> anyhow::Result<String> {
    // the points that can be drawn: finite, and positive x on a log axis
    let drawable =
        |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!chart.log_x || x > 0.0);
    let series: Vec<(&str, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .map(|s| {
            let mut pts: Vec<(f64, f64)> = s.points.iter().copied().filter(drawable).collect();
            // a line joins the points in x order (capacity probes arrive in bisection order)
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (s.name.as_str(), pts)
        })
        .collect();
    let hlines: Vec<(&str, f64)> = chart
        .hlines
        .iter()
        .filter(|h| h.1.is_finite())
        .map(|(n, y)| (n.as_str(), *y))
        .collect();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        anyhow::bail!("chart `{}` has no finite data point", chart.title);
    }
    let (x0, x1) = min_max(all.iter().map(|p| p.0));
    let (y0, y1) = min_max(all.iter().map(|p| p.1).chain(hlines.iter().map(|h| h.1)));
    let y = padded(y0, y1, y0 >= 0.0);
    let x = if chart.log_x {
        // multiplicative margin on a log axis
        let (a, b) = if x0 == x1 {
            (x0 / 2.0, x1 * 2.0)
        } else {
            (x0, x1)
        };
        a / 1.15..b * 1.15
    } else {
        padded(x0, x1, false)
    };
    let legend = legend_corner(&all, &hlines, &x, &y, chart.log_x);
    let plot = Plot {
        chart,
        series: &series,
        hlines: &hlines,
        x_span: x.clone(),
        x_whole: all.iter().all(|p| p.0.fract() == 0.0),
        legend,
    };
    let mut svg = String::new();
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if chart.log_x {
            plot.draw(&mut svg, x.log_scale().base(2.0), y)
        } else {
            plot.draw(&mut svg, x, y)
        }
    }));
    match drawn {
        Ok(r) => r.with_context(|| format!("drawing chart `{}`", chart.title))?,
        Err(_) => anyhow::bail!("drawing chart `{}` panicked", chart.title),
    }
    Ok(svg)
}

/// 渲染并原子地写出 SVG（同目录临时文件 + 重命名）。
pub fn write_svg(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let svg = render_svg(chart)?;
    super::write::write_atomic(path, svg.as_bytes())
}

/// 从一份完成的报告构造它能画的图：`(文件名后缀, 图)`，例如 `("memory-vs-seq", …)`。
///
/// 缺少数据的图不出现；图中只有报告里的测量值。
pub fn report_charts(report: &Report) -> Vec<(String, Chart)> {
    let mut out = Vec::new();
    match report.scenario["kind"].as_str() {
        Some("mla") => out.extend(mla_capacity(report).map(|c| ("memory-vs-seq".into(), c))),
        Some("mtp") => out.extend(mtp_sweep(report).map(|c| ("speedup-vs-depth".into(), c))),
        _ => {}
    }
    out.extend(memory_over_time(report).map(|c| ("memory-over-time".into(), c)));
    out
}

// ---------------------------------------------------------------------------------------------
// Drawing

/// What one draw needs besides the axis specs (which differ in type between linear and log).
struct Plot<'a> {
    chart: &'a Chart,
    series: &'a [(&'a str, Vec<(f64, f64)>)],
    hlines: &'a [(&'a str, f64)],
    x_span: Range<f64>,
    /// every x is a whole number (a depth, a batch): label only whole ticks
    x_whole: bool,
    legend: SeriesLabelPosition,
}

impl Plot<'_> {
    fn draw<X>(&self, svg: &mut String, x: X, y: Range<f64>) -> anyhow::Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        // plotters' errors borrow the backend; keep only their text
        let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
        let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut cc = ChartBuilder::on(&root)
            .caption(&self.chart.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x, y)
            .map_err(|x| e(&x))?;
        cc.configure_mesh()
            .x_desc(&self.chart.x_label)
            .y_desc(&self.chart.y_label)
            .x_label_formatter(&|v| {
                if self.x_whole && v.fract().abs() > 1e-9 {
                    String::new()
                } else {
                    tick(*v)
                }
            })
            .y_label_formatter(&|v| tick(*v))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let color = colour(i);
            cc.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            cc.draw_series(PointSeries::of_element(
                pts.iter().copied(),
                4,
                color.filled(),
                &|c, s, st| Circle::new(c, s, st),
            ))
            .map_err(|x| e(&x))?;
        }
        let Range { start, end } = self.x_span;
        for (j, (name, yv)) in self.hlines.iter().enumerate() {
            let color = colour(self.series.len() + j);
            let style = color.stroke_width(2);
            cc.draw_series(DashedLineSeries::new(
                [(start, *yv), (end, *yv)],
                10,
                6,
                style,
            ))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        cc.configure_series_labels()
            .position(self.legend.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    }
}

/// Distinct colours (Tableau 10), cycled.
fn colour(i: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b)
}

fn min_max(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    })
}

/// A linear axis range around `[lo, hi]` with a 6 % margin, from 0 when `from_zero`.
fn padded(lo: f64, hi: f64, from_zero: bool) -> Range<f64> {
    let lo = if from_zero { 0.0 } else { lo };
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let m = span * 0.06;
    (if from_zero { 0.0 } else { lo - m })..hi + m
}

/// The plot corner with the fewest data points (hlines count at a quarter and three quarters).
fn legend_corner(
    pts: &[(f64, f64)],
    hlines: &[(&str, f64)],
    x: &Range<f64>,
    y: &Range<f64>,
    log_x: bool,
) -> SeriesLabelPosition {
    let fx = |v: f64| {
        if log_x {
            (v / x.start).ln() / (x.end / x.start).ln()
        } else {
            (v - x.start) / (x.end - x.start)
        }
    };
    let fy = |v: f64| (v - y.start) / (y.end - y.start);
    let mut norm: Vec<(f64, f64)> = pts.iter().map(|&(a, b)| (fx(a), fy(b))).collect();
    for (_, h) in hlines {
        norm.extend([(0.25, fy(*h)), (0.75, fy(*h))]);
    }
    let count = |left: bool, upper: bool| {
        norm.iter()
            .filter(|&&(a, b)| (a < 0.5) == left && (b >= 0.5) == upper)
            .count()
    };
    [
        (SeriesLabelPosition::UpperLeft, count(true, true)),
        (SeriesLabelPosition::UpperRight, count(false, true)),
        (SeriesLabelPosition::LowerRight, count(false, false)),
        (SeriesLabelPosition::LowerLeft, count(true, false)),
    ]
    .into_iter()
    .min_by_key(|c| c.1)
    .map(|c| c.0)
    .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// Tick label: integers plainly, fractions to 3 decimals, very large/small in exponent form.
fn tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e7 || v.abs() < 1e-3) {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

// ---------------------------------------------------------------------------------------------
// Builders

/// MLA: measured memory of each capacity probe vs its sequence length, per variant, from the
/// report's typed series (`series.capacity_probes`, with the budget as a horizontal line).
fn mla_capacity(report: &Report) -> Option<Chart> {
    let mut series: Vec<Series> = Vec::new();
    for p in &report.series.capacity_probes {
        // a probe not run (clearly over budget) or not measurable has no value: no point
        let Some(b) = p.total_bytes else { continue };
        let pt = (p.seq as f64, b as f64 / MIB);
        match series.iter_mut().find(|s| s.name == p.variant) {
            Some(s) => s.points.push(pt),
            None => series.push(Series {
                name: p.variant.clone(),
                points: vec![pt],
            }),
        }
    }
    if series.is_empty() {
        return None;
    }
    let hlines = report
        .series
        .capacity_budget_bytes
        .map(|b| {
            let mib = b as f64 / MIB;
            (format!("memory budget ({} GiB)", mib / 1024.0), mib)
        })
        .into_iter()
        .collect();
    Some(Chart {
        title: "MLA capacity probes: measured memory vs sequence length".into(),
        x_label: "sequence length (tokens, log scale)".into(),
        y_label: "measured peak + prefill workspace (MiB)".into(),
        series,
        hlines,
        log_x: true,
    })
}

/// MTP: speculative / greedy tokens/s of each sweep point (`series.mtp_sweep`) vs D, per batch.
fn mtp_sweep(report: &Report) -> Option<Chart> {
    let mut by_batch: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &report.series.mtp_sweep {
        // a point whose output differs from greedy has no valid speedup (`speedup` is None)
        if let Some(r) = p.speedup() {
            by_batch
                .entry(p.batch)
                .or_default()
                .push((p.depth as f64, r));
        }
    }
    if by_batch.is_empty() {
        return None;
    }
    let hlines = report.scenario["thresholds"]["throughput_ratio"]
        .as_f64()
        .map(|t| (format!("SC-002b threshold ({t}x)"), t))
        .into_iter()
        .collect();
    Some(Chart {
        title: "MTP self-speculative decoding: speedup vs draft depth".into(),
        x_label: "draft depth D".into(),
        y_label: "speedup (speculative / greedy tokens/s)".into(),
        series: by_batch
            .into_iter()
            .map(|(b, points)| Series {
                name: format!("batch {b}"),
                points,
            })
            .collect(),
        hlines,
        log_x: false,
    })
}

/// Memory time series: MiB vs seconds, one line per memory source.
fn memory_over_time(report: &Report) -> Option<Chart> {
    let mut series: Vec<Series> = Vec::new();
    for s in &report.memory_series {
        let pt = (s.t_s, s.bytes as f64 / MIB);
        match series.iter_mut().find(|x| x.name == s.source) {
            Some(x) => x.points.push(pt),
            None => series.push(Series {
                name: s.source.clone(),
                points: vec![pt],
            }),
        }
    }
    (!series.is_empty()).then(|| Chart {
        title: "Memory over time".into(),
        x_label: "time since monitor start (s)".into(),
        y_label: "memory (MiB)".into(),
        series,
        hlines: Vec::new(),
        log_x: false,
    })
}

#[cfg(test)]
mod tests;
