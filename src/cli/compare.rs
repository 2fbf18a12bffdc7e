//! `dsopt compare`: one scenario on several backends, side by side.

use std::path::Path;

use clap::ValueEnum;

use dsopt::backend::{self, BackendChoice};
use dsopt::config::{Scenario, ScenarioKind};
use dsopt::error::{exit_code_of, DsoptError};
use dsopt::report::{
    self,
    compare::{BackendEntry, CompareReport},
};

use super::bench::bench_one;
use super::commands::log;
use super::{Format, OverrideArgs, RunArgs};

/// A scenario file, or the name of a kind for its shipped scenario.
fn resolve_target(target: &str) -> anyhow::Result<(String, Scenario)> {
    let path = Path::new(target);
    if path.exists() {
        return Ok((target.to_string(), Scenario::load(path)?));
    }
    match ScenarioKind::from_str(target, true) {
        Ok(kind) => Ok((
            kind.default_scenario().0.to_string(),
            Scenario::builtin(kind),
        )),
        Err(_) => Err(DsoptError::Usage(format!(
            "`{target}` is neither a scenario file nor a kind (mla, mtp, moe, calibrate, …)"
        ))
        .into()),
    }
}

fn choice_name(c: BackendChoice) -> String {
    c.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{c:?}").to_lowercase())
}

/// `dsopt compare --backends a,b,c SCENARIO`.
pub(super) fn compare_cmd(
    backends: &[BackendChoice],
    target: &str,
    out: &Path,
    format: Format,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let (file, scenario) = resolve_target(target)?;
    let mut rows = Vec::new();
    for &choice in backends {
        let name = choice_name(choice);
        let selected = match backend::select(choice) {
            Ok(sel) => sel,
            Err(e) => {
                log(
                    quiet,
                    format!("compare: backend {name} is not usable here: {e}"),
                );
                rows.push(BackendEntry::not_run(
                    &name,
                    true,
                    e.to_string(),
                    dsopt::error::EXIT_CANNOT_RUN,
                ));
                continue;
            }
        };
        let run = RunArgs {
            backend: choice,
            out: out.to_path_buf(),
            format: Format::Silent,
        };
        match bench_one(scenario.clone(), &file, o, &run, &selected, quiet) {
            Ok((r, path)) => rows.push(BackendEntry::ran(
                &name,
                &r,
                Some(path.display().to_string()),
            )),
            Err(e) => {
                let code = exit_code_of(&e);
                if code == dsopt::error::EXIT_BAD_INPUT {
                    return Err(e); // the same bad input on every backend: stop at once
                }
                eprintln!("error: backend {name}: {e:#}");
                rows.push(BackendEntry::not_run(&name, false, format!("{e:#}"), code));
            }
        }
    }
    let now = report::timefmt::now_secs();
    let cmp = CompareReport::new(&file, scenario.id(), rows, report::timefmt::rfc3339(now));
    let stem = format!(
        "{}-{}-compare",
        report::timefmt::compact(now),
        scenario.id()
    );
    let json = serde_json::to_string_pretty(&cmp)?;
    let path = report::write::write_json_and_markdown(out, &stem, &json, &cmp.to_markdown())?;
    match format {
        Format::Json => println!("{json}"),
        _ => print!("{}", cmp.render()),
    }
    log(quiet, format!("comparison: {} (+ .md)", path.display()));
    Ok(cmp.exit_code)
}
