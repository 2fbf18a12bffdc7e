//! `dsopt bench`: one scenario on one backend (overrides, the monitor, the report files).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use dsopt::backend::{BackendContext, BackendJob, SelectedBackend};
use dsopt::bench::{self, RunOutput};
use dsopt::checkpoint::fit::Fit;
use dsopt::config::{Overrides, Scenario};
use dsopt::error::DsoptError;
use dsopt::monitor::{progress, MonitorConfig};
use dsopt::report::{self, Report};

use dsopt::report::export::{Exporter, Json, TerminalTable};

use super::commands::log;
use super::{dispatch::dispatch, Format, OverrideArgs, RunArgs};

/// The scenario overrides of one run; a list of values (a sweep) is refused here.
pub(super) fn overrides(o: &OverrideArgs) -> Result<Overrides, DsoptError> {
    let one = |flag: &str, v: &[usize]| match v {
        [] => Ok(None),
        [x] => Ok(Some(*x)),
        _ => Err(DsoptError::Usage(format!(
            "--{flag} takes one value here; a list of values (a sweep) is for `dsopt bench`"
        ))),
    };
    Ok(Overrides {
        seq: one("seq", &o.seq)?,
        batch: one("batch", &o.batch)?,
        warmup: o.warmup,
        repetitions: o.repetitions,
        corpus: o.corpus.clone(),
        train_steps: o.train_steps,
        checkpoint: o.checkpoint.clone(),
        config: o.config.clone(),
        dtype: o.dtype,
        prompts: o.prompts.clone(),
        prompt_text: o.prompt_text.clone(),
        force: o.force,
    })
}

/// The swept parameter and its values when `--seq` or `--batch` has several values.
pub(super) fn sweep_of(o: &OverrideArgs) -> Result<Option<(&'static str, Vec<usize>)>, DsoptError> {
    match (o.seq.len() > 1, o.batch.len() > 1) {
        (true, true) => Err(DsoptError::Usage(
            "sweep one parameter at a time: give --seq or --batch a list, not both".into(),
        )),
        (true, false) => Ok(Some(("seq", o.seq.clone()))),
        (false, true) => Ok(Some(("batch", o.batch.clone()))),
        (false, false) => Ok(None),
    }
}

fn monitor_config(s: &Scenario, quiet: bool) -> MonitorConfig {
    let (warmup, repetitions) = match s {
        Scenario::Mla(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Mtp(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Moe(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Model(s) => (s.run.warmup, s.run.repetitions),
        Scenario::Calibrate(s) => (s.run.warmup, s.run.repetitions),
    };
    MonitorConfig {
        warmup,
        repetitions,
        progress: !quiet,
        ..Default::default()
    }
}

/// With `--model`, what the run keeps resident must fit this machine's memory before anything
/// is built (exit 3 with the bytes and `--layers` as the fix; [`Fit`]): `mla` the largest
/// variant's weights plus the capacity budget; `moe` its three variants together (measured
/// interleaved) plus 1 GiB; `model` the combined model with its MTP modules plus 1 GiB.
fn check_fits_in_memory(s: &Scenario) -> Result<(), DsoptError> {
    use dsopt::checkpoint::fit::ONE_GIB;
    let one_gib = || (ONE_GIB, "1 GiB".to_string());
    let (origin, layers, dtype) = match s {
        Scenario::Mla(m) => (&m.model_origin, m.model.n_layers, m.run.dtype),
        Scenario::Moe(m) if !m.offload.as_ref().is_some_and(|o| o.only) => {
            (&m.model_origin, m.model.n_layers, m.run.dtype)
        }
        Scenario::Model(m) => (&m.model_origin, m.model.n_layers, m.optimization.dtype),
        // SC-003b alone: its runner checks the resident twin against memory
        _ => return Ok(()),
    };
    let Some(origin) = origin else {
        return Ok(());
    };
    let elem = dtype.bytes() as u128;
    let fit = |what, min_layers, reserve| Fit {
        model: &origin.model,
        layers,
        total_layers: origin.total_layers,
        min_layers,
        what,
        dtype,
        reserve,
        none_fits: None,
    };
    match s {
        Scenario::Mla(m) => {
            let budget = (m.capacity.memory_budget_gib * ONE_GIB as f64) as u128;
            let reserve = (budget, format!("the {} capacity budget", bytes_h(budget)));
            fit("the largest variant's weights", 1, reserve).check(
                |n| {
                    let mut m = m.clone();
                    m.model.n_layers = n;
                    let params = |v| m.decoder_config(v).params() as u128;
                    m.attention
                        .variants
                        .iter()
                        .map(|&v| params(v))
                        .max()
                        .unwrap_or(0)
                        * elem
                },
                |n| format!("--layers {n} or fewer"),
            )
        }
        Scenario::Moe(m) => {
            use dsopt::config::MoeVariant;
            // an MoE layer must be kept: at least first_k_dense_replace + 1 layers
            let first = m.moe.first_k_dense_replace + 1;
            let what = "the three variants' weights (MoE, dense of equal total and of equal \
                        active size, resident together)";
            fit(what, first, one_gib()).check(
                |n| {
                    let mut m = m.clone();
                    m.model.n_layers = n;
                    let params = |v| m.decoder_config(v).params() as u128;
                    MoeVariant::ALL.iter().map(|&v| params(v)).sum::<u128>() * elem
                },
                |n| format!("--layers {n} or fewer (at least {first}: the first MoE layer)"),
            )
        }
        Scenario::Model(m) => {
            let o = &m.optimization;
            let first = match o.ffn {
                dsopt::config::FfnKind::Moe => o.moe.first_k_dense_replace + 1,
                dsopt::config::FfnKind::Dense => 1,
            };
            fit(
                "the model's parameters (with its MTP modules)",
                first,
                one_gib(),
            )
            .check(
                |n| {
                    let mut shape = m.model.clone();
                    shape.n_layers = n;
                    let cfg = o.decoder_config(&shape);
                    let mtp = dsopt::nn::mtp::MtpPredictor::<burn::backend::Flex>::params(
                        &cfg,
                        o.mtp_depth(),
                    );
                    (cfg.params() + mtp) as u128 * elem
                },
                |n| format!("--layers {n} (or fewer)"),
            )
        }
        _ => Ok(()),
    }
}

fn bytes_h(b: u128) -> String {
    report::write::bytes_h(Some(b.min(u64::MAX as u128) as u64))
}

/// The generic job run at the dispatch point.
struct BenchJob<'a> {
    scenario: &'a Scenario,
    monitor: MonitorConfig,
}

impl BackendJob for BenchJob<'_> {
    type Output = anyhow::Result<RunOutput>;
    fn run<B: burn::tensor::backend::Backend>(self, ctx: BackendContext<B>) -> Self::Output {
        bench::run_scenario(self.scenario, &ctx, self.monitor)
    }
}

/// Loads overrides, runs one scenario, writes the report files, prints the verdict; returns
/// the report and the path of its JSON file.
pub(super) fn bench_one(
    mut s: Scenario,
    file: &str,
    o: &OverrideArgs,
    run: &RunArgs,
    selected: &SelectedBackend,
    quiet: bool,
) -> anyhow::Result<(Report, PathBuf)> {
    dsopt::checkpoint::apply_model_source(&mut s, o.model.as_deref(), o.layers, file)?;
    s.apply(&overrides(o)?, Path::new(file))?;
    check_fits_in_memory(&s)?;
    dsopt::checkpoint::add_weights_to_budget(&mut s);
    let started = Instant::now();
    log(
        quiet,
        format!(
            "dsopt: {} `{}` on {} ({})",
            s.id(),
            s.title(),
            selected.kind,
            selected.device
        ),
    );
    progress::trace(format!("{}: start on {}", s.id(), selected.kind));
    let job = BenchJob {
        scenario: &s,
        monitor: monitor_config(&s, quiet),
    };
    let out = dispatch(selected, job)??;
    let report = bench::assemble(&s, file, selected, started, out);
    let stem = report::write::unique_stem(
        &run.out,
        &report::write::file_stem(&report, report::timefmt::now_secs()),
    );
    let files = report::write::write_all(&report, &run.out, &stem)
        .with_context(|| format!("writing the report into {}", run.out.display()))?;
    match run.format {
        Format::Json => print!("{}", Json.render(&report)?),
        Format::Table => print!("{}", TerminalTable.render(&report)?),
        Format::Silent => {}
    }
    log(
        quiet,
        format!(
            "report: {} (+ .csv, -memory.csv, .md, {} chart(s)) in {:.1} s",
            files.json.display(),
            files.charts.len(),
            report.wall_time_s
        ),
    );
    Ok((report, files.json))
}
