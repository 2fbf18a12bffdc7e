//! User-facing errors and their exit codes (docs/gate.md and the README list them).
//!
//! Exit codes: 0 all criteria passed · 1 a criterion failed · 2 bad input (usage, scenario,
//! report) · 3 the run could not be done (backend unavailable, out of memory, internal error).

use std::path::PathBuf;

/// Exit code: every criterion passed.
pub const EXIT_PASS: i32 = 0;
/// Exit code: at least one criterion failed.
pub const EXIT_FAIL: i32 = 1;
/// Exit code: bad input (usage, scenario, report).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code: the run could not be done.
pub const EXIT_CANNOT_RUN: i32 = 3;

/// The one severity rule for every aggregate (a `run` of several scenarios, a sweep, a backend
/// comparison): the most severe outcome decides — bad input (2), then a run that could not be
/// done (3), then a failed criterion (1); 0 only when every outcome is 0 (and for none).
pub fn most_severe(codes: impl IntoIterator<Item = i32>) -> i32 {
    let codes: Vec<i32> = codes.into_iter().collect();
    [EXIT_BAD_INPUT, EXIT_CANNOT_RUN, EXIT_FAIL]
        .into_iter()
        .find(|c| codes.contains(c))
        .unwrap_or(EXIT_PASS)
}

/// Errors that reach the user. Each one names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DsoptError {
    /// A scenario file that cannot be read, parsed or validated.
    #[error("{}", scenario_message(.file, .key, .line, .message, .fix))]
    Scenario {
        file: PathBuf,
        key: Option<String>,
        line: Option<usize>,
        message: String,
        fix: String,
    },
    /// A report file that is missing, unreadable or of an unknown schema.
    #[error("report {}: {message}", .file.display())]
    Report { file: PathBuf, message: String },
    /// A model description that cannot be used: a preset name, a checkpoint's `config.json` or
    /// weights (the file or preset, the key or tensor, what is wrong, the fix).
    #[error("{}", model_message(.source_name, .key, .message, .fix))]
    Model {
        source_name: String,
        key: Option<String>,
        message: String,
        fix: String,
    },
    /// A command-line usage problem not caught by the argument parser.
    #[error("{0}")]
    Usage(String),
    /// The requested backend is not compiled in or not usable on this machine.
    #[error("backend {backend}: {reason}")]
    BackendUnavailable { backend: String, reason: String },
    /// The run could not be carried out (runner missing, out of memory, internal error).
    #[error("{0}")]
    CannotRun(String),
}

fn scenario_message(
    file: &std::path::Path,
    key: &Option<String>,
    line: &Option<usize>,
    message: &str,
    fix: &str,
) -> String {
    let mut s = format!("scenario {}", file.display());
    if let Some(line) = line {
        s.push_str(&format!(":{line}"));
    }
    if let Some(key) = key {
        s.push_str(&format!(": key `{key}`"));
    }
    s.push_str(&format!(": {message}"));
    if !fix.is_empty() {
        s.push_str(&format!("\n  fix: {fix}"));
    }
    s
}

fn model_message(source: &str, key: &Option<String>, message: &str, fix: &str) -> String {
    let mut s = format!("model {source}");
    if let Some(key) = key {
        s.push_str(&format!(": key `{key}`"));
    }
    s.push_str(&format!(": {message}"));
    if !fix.is_empty() {
        s.push_str(&format!("\n  fix: {fix}"));
    }
    s
}

impl DsoptError {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            DsoptError::Scenario { .. }
            | DsoptError::Report { .. }
            | DsoptError::Model { .. }
            | DsoptError::Usage(_) => EXIT_BAD_INPUT,
            DsoptError::BackendUnavailable { .. } | DsoptError::CannotRun(_) => EXIT_CANNOT_RUN,
        }
    }
}

/// Exit code for any error: a `DsoptError` anywhere in the chain decides, else 3.
pub fn exit_code_of(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<DsoptError>())
        .map(DsoptError::exit_code)
        .unwrap_or(EXIT_CANNOT_RUN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_error_names_file_line_key_and_fix() {
        let e = DsoptError::Scenario {
            file: "a.toml".into(),
            key: Some("model.num_attention_heads".into()),
            line: Some(7),
            message: "must be at least 1".into(),
            fix: "set num_attention_heads = 16".into(),
        };
        let s = e.to_string();
        assert_eq!(
            s,
            "scenario a.toml:7: key `model.num_attention_heads`: must be at least 1\n  fix: set num_attention_heads = 16"
        );
        assert_eq!(e.exit_code(), EXIT_BAD_INPUT);
    }

    #[test]
    fn the_most_severe_outcome_decides_the_exit_code() {
        assert_eq!(most_severe([]), EXIT_PASS);
        assert_eq!(most_severe([EXIT_PASS, EXIT_PASS]), EXIT_PASS);
        assert_eq!(most_severe([EXIT_PASS, EXIT_FAIL]), EXIT_FAIL);
        assert_eq!(most_severe([EXIT_FAIL, EXIT_CANNOT_RUN]), EXIT_CANNOT_RUN);
        assert_eq!(
            most_severe([EXIT_CANNOT_RUN, EXIT_BAD_INPUT, EXIT_FAIL]),
            EXIT_BAD_INPUT
        );
    }

    #[test]
    fn exit_code_found_through_context() {
        let e = anyhow::Error::new(DsoptError::BackendUnavailable {
            backend: "cuda".into(),
            reason: "x".into(),
        })
        .context("while running");
        assert_eq!(exit_code_of(&e), EXIT_CANNOT_RUN);
        let plain = anyhow::anyhow!("boom");
        assert_eq!(exit_code_of(&plain), EXIT_CANNOT_RUN);
        let usage = anyhow::Error::new(DsoptError::Usage("bad".into())).context("ctx");
        assert_eq!(exit_code_of(&usage), EXIT_BAD_INPUT);
    }
}
