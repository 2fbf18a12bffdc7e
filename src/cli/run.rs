//! `dsopt run`: several scenarios, one report each, and the summary (report::summary).

use std::path::PathBuf;

use dsopt::backend;
use dsopt::backend::machine::ToolInfo;
use dsopt::bench;
use dsopt::config::{Scenario, ScenarioKind};
use dsopt::error::DsoptError;
use dsopt::report::{self, Verdict};

use super::bench::{bench_one, overrides};
use super::commands::log;
use super::{Format, OverrideArgs, RunArgs};
use dsopt::report::summary::{summary_markdown, Summary, SummaryEntry};

/// Expands directories into their `*.toml` files (sorted).
pub(super) fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    out
}

pub(super) fn run_many(
    paths: &[PathBuf],
    run: &RunArgs,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let files = expand(paths);
    if files.is_empty() {
        return Err(DsoptError::Usage(
            "no scenario files found (a directory is searched for *.toml)".into(),
        )
        .into());
    }
    overrides(o)?; // a list of values (a sweep) is refused once, before anything runs
    let selected = backend::select(run.backend)?;
    let mut entries = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let result = Scenario::load(f)
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                // --config replaces the [optimization] section of `model` scenarios only
                let mut o = o.clone();
                if o.config.is_some() && s.kind() != ScenarioKind::Model {
                    o.config = None;
                }
                // --prompts feeds the checkpoint runs of `mtp` and `moe` scenarios only
                if !matches!(s.kind(), ScenarioKind::Mtp | ScenarioKind::Moe) {
                    o.prompts = None;
                    o.prompt_text = None;
                }
                let o = &o;
                let quiet_table = RunArgs {
                    // JSON mode: stdout holds the summary only
                    format: if run.format == Format::Json {
                        Format::Silent
                    } else {
                        Format::Table
                    },
                    ..run.clone()
                };
                bench_one(s, &name, o, &quiet_table, &selected, quiet)
            });
        let entry = match result {
            Ok((r, path)) => SummaryEntry {
                scenario_file: name,
                id: r.scenario["id"].as_str().map(String::from),
                verdict: Some(r.verdict),
                report: Some(path.display().to_string()),
                exit_code: r.verdict.exit_code(),
                error: None,
                criteria: r.criteria.clone(),
            },
            Err(e) => {
                eprintln!("error: {e:#}");
                SummaryEntry {
                    scenario_file: name,
                    id: None,
                    verdict: None,
                    report: None,
                    exit_code: dsopt::error::exit_code_of(&e),
                    error: Some(format!("{e:#}")),
                    criteria: vec![],
                }
            }
        };
        entries.push(entry);
    }
    let code = dsopt::error::most_severe(entries.iter().map(|e| e.exit_code));
    let all: Vec<report::Criterion> = entries.iter().flat_map(|e| e.criteria.clone()).collect();
    let verdict = if entries.iter().any(|e| e.verdict.is_none()) {
        Verdict::Error
    } else {
        Verdict::of(&all)
    };
    let now = report::timefmt::now_secs();
    let summary = Summary {
        schema_version: report::SCHEMA_VERSION,
        kind: "summary",
        tool: ToolInfo::current(),
        created_at: report::timefmt::rfc3339(now),
        backend: Some(bench::backend_report(&selected)),
        scenarios: entries,
        verdict,
        exit_code: code,
    };
    let stem = report::write::unique_stem(
        &run.out,
        &format!("{}-summary", report::timefmt::compact(now)),
    );
    let json_path = run.out.join(format!("{stem}.json"));
    report::write::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let md_path = run.out.join(format!("{stem}.md"));
    report::write::write_atomic(&md_path, summary_markdown(&summary).as_bytes())?;
    if run.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
            .set_header(vec!["scenario", "id", "verdict", "exit", "error"]);
        for e in &summary.scenarios {
            t.add_row(vec![
                e.scenario_file.clone(),
                e.id.clone().unwrap_or_default(),
                e.verdict
                    .map(|v| v.as_str().to_string())
                    .unwrap_or("—".into()),
                e.exit_code.to_string(),
                e.error.clone().unwrap_or_default(),
            ]);
        }
        println!("{t}\noverall: {} (exit {code})", summary.verdict.as_str());
    }
    log(quiet, format!("summary: {}", json_path.display()));
    Ok(code)
}
