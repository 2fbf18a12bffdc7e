//! Writers: JSON (full), CSV (variant x metric + criteria; memory time series apart) and a
//! Markdown summary with Chinese headings, plus the SVG charts of `report::chart` linked from it.
//! Every file is written atomically (temp + rename).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::schema::*;

/// Paths of the files written for one report.
#[derive(Debug, Clone)]
pub struct WrittenFiles {
    /// Full JSON report.
    pub json: PathBuf,
    /// CSV: one row per variant x metric, and one per criterion.
    pub csv: PathBuf,
    /// CSV: the memory time series.
    pub memory_csv: PathBuf,
    /// Markdown summary (Chinese).
    pub markdown: PathBuf,
    /// SVG charts, `<stem>-<suffix>.svg` (only those rendered; see `report::chart`).
    pub charts: Vec<PathBuf>,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("report");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The file stem: `<UTC time>-<id>-<kind>`, which sorts by time and names the scenario.
pub fn file_stem(report: &Report, unix_secs: u64) -> String {
    let id = report.scenario["id"].as_str().unwrap_or("scenario");
    let kind = report.scenario["kind"].as_str().unwrap_or("run");
    let slug: String = format!("{id}-{kind}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{}-{slug}", super::timefmt::compact(unix_secs))
}

/// `stem`, or `stem-2`, `stem-3`, … : the first whose `.json` is not yet in `dir` (runs that
/// finish within the same second, as the points of a sweep, must not overwrite each other).
pub fn unique_stem(dir: &Path, stem: &str) -> String {
    let mut candidate = stem.to_string();
    let mut n = 1;
    while dir.join(format!("{candidate}.json")).exists() {
        n += 1;
        candidate = format!("{stem}-{n}");
    }
    candidate
}

/// Writes `text` as `<stem>.json` / `.md` style files into `out` (atomic).
pub fn write_json_and_markdown(
    out: &Path,
    stem: &str,
    json: &str,
    md: &str,
) -> anyhow::Result<PathBuf> {
    let stem = unique_stem(out, stem);
    let json_path = out.join(format!("{stem}.json"));
    write_atomic(&json_path, json.as_bytes())?;
    write_atomic(&out.join(format!("{stem}.md")), md.as_bytes())?;
    Ok(json_path)
}

/// Writes every format of `report` into `dir`; returns the paths.
pub fn write_all(report: &Report, dir: &Path, stem: &str) -> anyhow::Result<WrittenFiles> {
    use super::export::{Csv, Exporter, Json, Markdown, MemoryCsv};
    let at = |e: &dyn Exporter| dir.join(format!("{stem}{}", e.file_suffix().unwrap_or("")));
    let mut files = WrittenFiles {
        json: at(&Json),
        csv: at(&Csv),
        memory_csv: at(&MemoryCsv),
        markdown: at(&Markdown),
        charts: Vec::new(),
    };
    for (e, path) in [
        (&Json as &dyn Exporter, &files.json),
        (&Csv, &files.csv),
        (&MemoryCsv, &files.memory_csv),
    ] {
        write_atomic(path, e.render(report)?.as_bytes())?;
    }
    // charts before the Markdown, which links only those written; a failed chart costs a warning
    let mut md = Markdown.render(report)?;
    let mut links = String::new();
    for (suffix, chart) in super::chart::report_charts(report) {
        let file = format!("{stem}-{suffix}.svg");
        let path = dir.join(&file);
        match super::chart::write_svg(&chart, &path) {
            Ok(()) => {
                let _ = writeln!(
                    links,
                    "![{}]({file})\n",
                    chart.title.replace(['[', ']'], "")
                );
                files.charts.push(path);
            }
            Err(e) => eprintln!(
                "dsopt: warning: chart {} not written: {e:#}",
                path.display()
            ),
        }
    }
    if !links.is_empty() {
        let _ = write!(md, "\n## 图表\n\n{links}");
    }
    write_atomic(&files.markdown, md.as_bytes())?;
    Ok(files)
}

/// Pretty JSON.
pub fn to_json(report: &Report) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(report)? + "\n")
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

/// CSV rows: `section,name,metric,value,unit` (empty value = not measured).
pub fn to_csv(report: &Report) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["section", "name", "metric", "value", "unit"])?;
    for v in &report.variants {
        let mut row = |metric: &str, value: String, unit: &str| {
            w.write_record(["variant", &v.name, metric, &value, unit])
        };
        row("status", format!("{:?}", v.status).to_lowercase(), "")?;
        if let Some(t) = &v.timings {
            for (k, x) in [
                ("mean_s", Some(t.mean_s)),
                ("median_s", Some(t.median_s)),
                ("stddev_s", t.stddev_s),
                ("cv", t.cv),
                ("min_s", Some(t.min_s)),
                ("max_s", Some(t.max_s)),
                ("p90_s", t.p90_s),
            ] {
                // an unmeasured statistic (one sample: no spread) is an empty cell, not 0
                let x = x.map(|x| format!("{x}")).unwrap_or_default();
                row(k, x, if k == "cv" { "" } else { "s" })?;
            }
            row("samples", t.samples_s.len().to_string(), "")?;
        }
        let m = &v.memory.measured;
        for (k, x) in [
            ("device_peak_bytes", m.device_peak_bytes),
            ("device_reserved_peak_bytes", m.device_reserved_peak_bytes),
            ("device_baseline_bytes", m.device_baseline_bytes),
            ("nvml_peak_bytes", m.nvml_peak_bytes),
            ("nvml_process_peak_bytes", m.nvml_process_peak_bytes),
            ("host_peak_bytes", m.host_peak_bytes),
            ("host_baseline_bytes", m.host_baseline_bytes),
        ] {
            row(k, x.map(|b| b.to_string()).unwrap_or_default(), "bytes")?;
        }
        if let Some(a) = &v.memory.analytic {
            row(
                "analytic_weights_bytes",
                a.weights_bytes.to_string(),
                "bytes",
            )?;
            row(
                "analytic_kv_cache_bytes",
                a.kv_cache_bytes.to_string(),
                "bytes",
            )?;
            row(
                "analytic_activations_bytes",
                a.activations_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_default(),
                "bytes",
            )?;
        }
        for (k, x) in &v.metrics {
            row(k, opt(*x), "")?;
        }
        if v.equivalence.checked {
            row(
                "equivalence_max_abs_diff",
                opt(v.equivalence.max_abs_diff),
                "",
            )?;
            row(
                "equivalence_passed",
                v.equivalence
                    .passed
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                "",
            )?;
        }
    }
    for c in &report.criteria {
        w.write_record([
            "criterion",
            &c.id,
            &format!("{} {} {}", c.metric, c.comparison.symbol(), c.threshold),
            &opt(c.measured),
            if c.passed { "pass" } else { "fail" },
        ])?;
    }
    w.write_record(["verdict", "", "", report.verdict.as_str(), ""])?;
    Ok(w.into_inner()?)
}

/// CSV of the memory time series: `t_s,variant,source,bytes,label`.
pub fn memory_csv(report: &Report) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["t_s", "variant", "source", "bytes", "label"])?;
    for s in &report.memory_series {
        w.write_record([
            format!("{:.6}", s.t_s),
            s.variant.clone(),
            s.source.clone(),
            s.bytes.to_string(),
            s.label.clone(),
        ])?;
    }
    Ok(w.into_inner()?)
}

/// Human size: `1.50 GiB`; `—` when not measured.
pub fn bytes_h(b: Option<u64>) -> String {
    match b {
        None => "—".into(),
        Some(b) => {
            let units = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut x = b as f64;
            let mut u = 0;
            while x >= 1024.0 && u < units.len() - 1 {
                x /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{b} B")
            } else {
                format!("{x:.2} {}", units[u])
            }
        }
    }
}

/// Seconds in a readable unit.
pub fn secs_h(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// A measured number for tables; `—` when absent.
pub fn num_h(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x != 0.0 && (x.abs() >= 1e5 || x.abs() < 1e-3) => format!("{x:.3e}"),
        Some(x) => format!("{x:.4}"),
    }
}

/// Markdown summary with Chinese headings.
pub fn to_markdown(r: &Report) -> String {
    let mut s = String::new();
    md_header(&mut s, r);
    md_criteria(&mut s, r);
    md_variants(&mut s, r);
    md_metrics(&mut s, r);
    md_notes(&mut s, r);
    md_machine(&mut s, &r.machine);
    s
}

/// Title, overall verdict, time, tool, backend and scenario file.
fn md_header(s: &mut String, r: &Report) {
    let id = r.scenario["id"].as_str().unwrap_or("?");
    let title = r.scenario["title"].as_str().unwrap_or("");
    let _ = writeln!(s, "# dsopt 报告：{id} — {title}\n");
    let verdict_zh = match r.verdict {
        Verdict::Pass => "通过（pass）",
        Verdict::Fail => "未通过（fail）",
        Verdict::Error => "无法判定（error：有标准未能测量）",
        Verdict::Inconclusive => "无定论（inconclusive：有标准的测量值只是下界，没达到阈值）",
    };
    let _ = writeln!(s, "**总判定：{verdict_zh}**\n");
    let _ = writeln!(
        s,
        "- 时间：{}；墙钟 {:.1} s\n- 工具：{} {}（commit {}）\n- 后端：{}（{}），特性：{}\n- 场景文件：`{}`\n",
        r.created_at,
        r.wall_time_s,
        r.tool.name,
        r.tool.version,
        r.tool.git_commit.as_deref().unwrap_or("未知"),
        r.backend.name,
        r.backend.device,
        r.backend.features.join(", "),
        r.scenario_file
    );
}

/// The operating point and the criteria table.
fn md_criteria(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## 验收标准\n");
    match &r.spec {
        Some(st) if st.conformant => {
            let _ = writeln!(s, "在规格的工作点上测得（门禁按规格标准把关）。\n");
        }
        Some(st) => {
            let _ = writeln!(
                s,
                "**不在规格的工作点上**（标准编号带 `@`，不是规格的判定；门禁默认拒绝）：{}\n",
                st.deviations.join("；")
            );
        }
        None => {
            let _ = writeln!(s, "（模式版本 1 的报告：没有记录工作点。）\n");
        }
    }
    let _ = writeln!(
        s,
        "| 编号 | 指标 | 阈值 | 测量值 | 结果 | 说明 |\n|---|---|---|---|---|---|"
    );
    for c in &r.criteria {
        let _ = writeln!(
            s,
            "| {} | {} | {} {} | {} | {} | {} |",
            c.id,
            c.metric,
            c.comparison.symbol(),
            c.threshold,
            num_h(c.measured),
            match c.outcome() {
                Outcome::NotApplicable => "不适用",
                _ if c.passed && c.outcome() == Outcome::Marginal => "通过（勉强：在噪声带内）",
                _ if c.passed => "通过",
                Outcome::Inconclusive => "无定论（下界未达阈值）",
                Outcome::NotMeasured => "未能测量",
                _ => "未通过",
            },
            c.note.replace('|', "/")
        );
    }
}

/// The variants table: status, timings, peaks, equivalence, key figures.
fn md_variants(s: &mut String, r: &Report) {
    let _ = writeln!(s, "\n## 变体\n");
    let _ = writeln!(
        s,
        "| 变体 | 状态 | 中位数 | 均值 | CV | 样本数 | 主机峰值 | 设备峰值 | NVML 峰值 | 等价性 | 速度（占实测上限） |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for v in &r.variants {
        let (med, mean, cv, n) = match &v.timings {
            Some(t) => (
                secs_h(t.median_s),
                secs_h(t.mean_s),
                t.cv.map(|cv| format!("{:.1} %", cv * 100.0))
                    .unwrap_or_else(|| "—".into()),
                t.samples_s.len().to_string(),
            ),
            None => ("—".into(), "—".into(), "—".into(), "0".into()),
        };
        let eq = match (v.equivalence.checked, v.equivalence.passed) {
            (false, _) => "未检查".to_string(),
            (true, Some(true)) => {
                format!("通过（最大绝对误差 {}）", num_h(v.equivalence.max_abs_diff))
            }
            (true, _) => format!(
                "未通过（最大绝对误差 {}）",
                num_h(v.equivalence.max_abs_diff)
            ),
        };
        let status = match v.status {
            VariantStatus::Ok => "正常".to_string(),
            VariantStatus::Failed => format!("失败：{}", v.error.as_deref().unwrap_or("")),
            VariantStatus::Skipped => format!("跳过：{}", v.error.as_deref().unwrap_or("")),
        };
        let m = &v.memory.measured;
        let _ = writeln!(
            s,
            "| {} | {} | {med} | {mean} | {cv} | {n} | {} | {} | {} | {eq} | {} |",
            v.name,
            status.replace('|', "/"),
            bytes_h(m.host_peak_bytes),
            bytes_h(m.device_peak_bytes),
            bytes_h(m.nvml_peak_bytes),
            super::table::key_figures(v).join("<br>"),
        );
    }
}

/// Every variant's metrics, and the analytic memory breakdown.
fn md_metrics(s: &mut String, r: &Report) {
    let metrics: Vec<_> = r
        .variants
        .iter()
        .filter(|v| !v.metrics.is_empty())
        .collect();
    if !metrics.is_empty() {
        let _ = writeln!(s, "\n## 指标\n");
        for v in metrics {
            let _ = writeln!(s, "- **{}**：", v.name);
            for (k, x) in &v.metrics {
                let _ = writeln!(s, "  - {k} = {}", num_h(*x));
            }
        }
    }
    let analytic: Vec<_> = r
        .variants
        .iter()
        .filter_map(|v| v.memory.analytic.as_ref().map(|a| (&v.name, a)))
        .collect();
    if !analytic.is_empty() {
        let _ = writeln!(
            s,
            "\n## 内存解析分解\n\n| 变体 | 权重 | KV 缓存 | 激活 |\n|---|---|---|---|"
        );
        for (name, a) in analytic {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                name,
                bytes_h(Some(a.weights_bytes)),
                bytes_h(Some(a.kv_cache_bytes)),
                bytes_h(a.activations_bytes)
            );
        }
    }
}

/// The variants' warnings and the report's notes.
fn md_notes(s: &mut String, r: &Report) {
    let warns: Vec<String> = r
        .variants
        .iter()
        .flat_map(|v| v.warnings.iter().map(move |w| format!("{}：{w}", v.name)))
        .chain(r.notes.iter().cloned())
        .collect();
    if !warns.is_empty() {
        let _ = writeln!(s, "\n## 警告与说明\n");
        for w in warns {
            let _ = writeln!(s, "- {w}");
        }
    }
}

/// The machine the report was measured on.
fn md_machine(s: &mut String, m: &crate::backend::machine::MachineInfo) {
    let _ = writeln!(
        s,
        "\n## 机器\n\n- CPU：{}（{} 核；CPU 内核 SIMD 级别：{}）\n- 内存：{}\n- 操作系统：{}",
        m.cpu,
        m.cores,
        m.simd.as_deref().unwrap_or("未记录"),
        bytes_h(Some(m.ram_bytes)),
        m.os
    );
    if m.gpus.is_empty() {
        let _ = writeln!(s, "- GPU：无");
    }
    for g in &m.gpus {
        let _ = writeln!(
            s,
            "- GPU：{}（驱动 {}，显存 {}，来源 {}）",
            g.name,
            g.driver.as_deref().unwrap_or("未知"),
            bytes_h(g.memory_bytes),
            g.source
        );
    }
}

/// A fraction of a measured limit as the tables show it: `" · 46 % of read BW"`; a fraction
/// above 1 is flagged, not printed as a plain 105 % — the limit was not measured at this
/// working set (a step whose bytes sit in a cache reads faster than a streaming limit).
pub fn fraction_text(fraction: Option<f64>, what: &str) -> String {
    match fraction {
        Some(f) if f > 1.0 => format!(
            " · {:.0} % {what}: above the measured limit (not measured at this working set)",
            f * 100.0
        ),
        Some(f) => format!(" · {:.0} % {what}", f * 100.0),
        None => String::new(),
    }
}

#[cfg(test)]
mod fraction_tests {
    use super::*;

    #[test]
    fn a_fraction_above_its_limit_is_flagged() {
        assert_eq!(
            fraction_text(Some(0.46), "of read BW"),
            " · 46 % of read BW"
        );
        let over = fraction_text(Some(1.05), "of read BW");
        assert!(
            over.contains("above the measured limit") && over.contains("105 %"),
            "{over}"
        );
        assert_eq!(fraction_text(None, "of GEMM"), "");
    }
}
