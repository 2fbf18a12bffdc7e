//! The subcommand router (one file per subcommand beside it). Answers go to stdout; progress
//! and logs to stderr.

use dsopt::backend;
use dsopt::config::Scenario;
use dsopt::error::DsoptError;
use dsopt::report::gate;

use super::bench::{bench_one, sweep_of};
use super::compare::compare_cmd;
use super::gate::gate_cmd;
use super::info::info;
use super::run::run_many;
use super::sweep::sweep_cmd;
use super::train::train_cmd;
use super::validate::validate;
use super::verify::{verify_cmd, VerifyArgs};
use super::{Cli, Command};

/// Runs the parsed command; returns the exit code.
pub fn run(cli: &Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Info { json } => info(*json, cli.quiet),
        Command::Bench {
            kind,
            scenario,
            run,
            overrides,
        } => {
            let (file, s) = match scenario {
                Some(path) => (path.display().to_string(), Scenario::load(path)?),
                None => (
                    kind.default_scenario().0.to_string(),
                    Scenario::builtin(*kind),
                ),
            };
            if s.kind() != *kind {
                return Err(DsoptError::Usage(format!(
                    "{file} is a `{}` scenario, but `dsopt bench {}` was asked for; use `dsopt \
                     bench {}` or `dsopt run {file}`",
                    s.kind().as_str(),
                    kind.as_str(),
                    s.kind().as_str()
                ))
                .into());
            }
            let selected = backend::select(run.backend)?;
            if let Some((param, values)) = sweep_of(overrides)? {
                return sweep_cmd(
                    s, &file, overrides, run, &selected, param, &values, cli.quiet,
                );
            }
            let (report, _) = bench_one(s, &file, overrides, run, &selected, cli.quiet)?;
            Ok(report.verdict.exit_code())
        }
        Command::Compare {
            backends,
            target,
            out,
            format,
            overrides,
        } => compare_cmd(backends, target, out, *format, overrides, cli.quiet),
        Command::Run {
            paths,
            run,
            overrides,
        } => run_many(paths, run, overrides, cli.quiet),
        Command::Gate {
            reports,
            baseline,
            noise,
            require,
            allow_different_machine,
            allow_off_spec,
            strict,
        } => gate_cmd(
            reports,
            baseline.as_deref(),
            gate::GateOptions {
                require: require.clone(),
                noise: *noise,
                allow_different_machine: *allow_different_machine,
                allow_off_spec: *allow_off_spec,
                strict: *strict,
            },
        ),
        Command::Validate { paths } => validate(paths),
        Command::Verify {
            model,
            reference,
            layers,
            dtype,
            backend,
            format,
        } => verify_cmd(VerifyArgs {
            model,
            reference,
            layers: *layers,
            dtype: *dtype,
            backend: *backend,
            format: *format,
            quiet: cli.quiet,
        }),
        Command::Train {
            scenario,
            cache_dir,
            overrides: o,
        } if o.model.is_some()
            || o.layers.is_some()
            || o.prompts.is_some()
            || o.prompt_text.is_some() =>
        {
            Err(DsoptError::Usage(
                "--model/--layers/--prompts/--prompt-text: `dsopt train` trains the byte-level MTP model of an \
             SC-002 scenario; drop them"
                    .into(),
            )
            .into())
        }
        Command::Train {
            scenario,
            cache_dir,
            overrides: o,
        } => train_cmd(
            scenario.as_deref(),
            cache_dir.as_deref(),
            o.force,
            o,
            cli.quiet,
        ),
    }
}

pub(super) fn log(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", msg.as_ref());
    }
}
