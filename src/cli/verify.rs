//! `dsopt verify`: a checkpoint against transformers' reference logits.

use std::path::{Path, PathBuf};

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Color, Table};
use dsopt::backend::{self, BackendChoice};
use dsopt::checkpoint::reference::Reference;
use dsopt::checkpoint::verify::{VerifyJob, VerifyOutcome};
use dsopt::checkpoint::{resolve, ModelSource};
use dsopt::config::Dtype;
use dsopt::error::DsoptError;

use super::dispatch::dispatch;
use super::Format;

/// The arguments of `dsopt verify`.
pub struct VerifyArgs<'a> {
    pub model: &'a str,
    pub reference: &'a Path,
    pub layers: Option<usize>,
    pub dtype: Option<Dtype>,
    pub backend: BackendChoice,
    pub format: Format,
    pub quiet: bool,
}

/// Runs the check; exit 0 when every path is within tolerance, 1 otherwise.
pub fn verify_cmd(a: VerifyArgs<'_>) -> anyhow::Result<i32> {
    let reference = Reference::read(a.reference)?;
    let layers = match (a.layers, reference.layers) {
        (Some(n), Some(r)) if n != r => {
            return Err(DsoptError::Usage(format!(
                "--layers {n}: {} was made with {r} layers and is only compared with --layers {r}",
                a.reference.display()
            ))
            .into())
        }
        (Some(n), None) => {
            return Err(DsoptError::Usage(format!(
                "--layers {n}: {} was made with the whole model; drop --layers or make a \
                 reference with `scripts/make_reference.py --layers {n}`",
                a.reference.display()
            ))
            .into())
        }
        (n, r) => n.or(r),
    };
    let spec = resolve(a.model, layers)?;
    let ModelSource::Dir(dir) = &spec.source else {
        return Err(DsoptError::Usage(format!(
            "--model {}: `dsopt verify` needs a checkpoint folder (a preset has no weights)",
            a.model
        ))
        .into());
    };
    let c = &spec.config;
    if reference.vocab != c.vocab_size {
        return Err(DsoptError::Model {
            source_name: a.reference.display().to_string(),
            key: Some("logits".into()),
            message: format!(
                "has a vocabulary of {}; the checkpoint's config.json says {}",
                reference.vocab, c.vocab_size
            ),
            fix: "make the reference from this checkpoint with scripts/make_reference.py".into(),
        }
        .into());
    }
    if let Some(&t) = reference
        .input_ids
        .iter()
        .flatten()
        .find(|&&t| t >= c.vocab_size)
    {
        return Err(DsoptError::Model {
            source_name: a.reference.display().to_string(),
            key: Some("input_ids".into()),
            message: format!(
                "holds token {t}, outside the vocabulary of {}",
                c.vocab_size
            ),
            fix: "make the reference from this checkpoint with scripts/make_reference.py".into(),
        }
        .into());
    }
    // the checkpoint's own dtype unless told otherwise (FP8 checkpoints compute in bf16)
    let dtype = a.dtype.or(c.dtype).unwrap_or(Dtype::F32);
    dsopt::checkpoint::check_fits(
        &resolve(a.model, None)?.config,
        c.num_hidden_layers,
        1,
        dtype,
        a.model,
        |n| {
            format!(
                "make the reference with `scripts/make_reference.py --layers {n}` and verify with \
                 --layers {n} (or fewer)"
            )
        },
        None,
    )?;
    let selected = backend::select(a.backend)?;
    let outcome = dispatch(
        &selected,
        VerifyJob {
            dir: PathBuf::from(dir),
            config: c.clone(),
            reference,
            dtype,
            quiet: a.quiet,
            total_layers: spec.total_layers,
        },
    )??;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&outcome)?),
        Format::Table => print_outcome(&outcome, &spec.title, spec.total_layers),
        Format::Silent => {}
    }
    Ok(if outcome.pass { 0 } else { 1 })
}

fn print_outcome(o: &VerifyOutcome, title: &str, total_layers: usize) {
    println!(
        "verify {title}: {} of {total_layers} layers, {}, backend {}, {} prompt(s) of {} tokens",
        o.layers,
        o.dtype.as_str(),
        o.backend,
        o.batch,
        o.seq
    );
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "path",
        "max |Δ|",
        "max |Δ| / max |ref|",
        "tolerance",
        "argmax agree",
        "positions",
        "verdict",
    ]);
    for p in &o.paths {
        t.add_row(vec![
            Cell::new(&p.path),
            Cell::new(format!("{:.3e}", p.max_abs_diff)),
            Cell::new(format!("{:.3e}", p.rel_diff)),
            Cell::new(format!("{:.1e}", p.tolerance)),
            Cell::new(format!("{}/{}", p.argmax_agree, p.argmax_counted)),
            Cell::new(format!("{}/{}", p.positions_compared, p.positions)),
            if p.pass {
                Cell::new("PASS").fg(Color::Green)
            } else {
                Cell::new("FAIL").fg(Color::Red)
            },
        ]);
    }
    println!("{t}");
    for n in &o.notes {
        println!("note: {n}");
    }
    if o.paths.iter().any(|p| p.positions_compared < p.positions) {
        println!(
            "positions: half precision compares only the positions whose MoE routing is robust \
             (the reference's route_stable); after a near-tie, rounding may pick other experts"
        );
    }
    println!(
        "verify: {}",
        if o.pass {
            "PASS — every path agrees with the reference"
        } else {
            "FAIL — a path disagrees with the reference"
        }
    );
}
