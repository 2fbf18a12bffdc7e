//! 配置诊断：把 TOML 错误与校验违规变成“文件、行号、键名、怎么改”的错误（配置模块的叶子）。

use std::path::Path;

use crate::error::DsoptError;

/// One problem found in a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Dotted key, e.g. `model.num_attention_heads`.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub fix: String,
}

/// Finds the 1-based line of a dotted key (`section.key` or top-level `key`) in TOML text.
/// Handles `[section]` headers and `key = value` lines; returns `None` when not present.
pub fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = match dotted.rsplit_once('.') {
        Some((s, k)) => (s, k),
        None => ("", dotted),
    };
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h.trim_end_matches(']').trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    // a section with an invalid whole value (e.g. empty table): point at its header
    if !section.is_empty() {
        for (i, raw) in text.lines().enumerate() {
            if raw.trim() == format!("[{section}]") {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Turns a TOML parse/deserialise error into a scenario error with key, line and a fix.
pub(crate) fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> DsoptError {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let msg = e.message().trim().to_string();
    // serde messages quote the offending field in backticks: "unknown field `foo`, expected ...";
    // for a bad value ("unknown variant `x`", "invalid type") the key is the one at the span
    let quoted = msg.split('`').nth(1).map(str::to_string);
    let key = if msg.starts_with("unknown field") || msg.starts_with("missing field") {
        quoted
    } else {
        e.span()
            .and_then(|span| key_at(text, span.start))
            .or(quoted)
    };
    let fix = if msg.starts_with("unknown field") {
        "remove or rename the key; the accepted keys are listed above".to_string()
    } else if msg.starts_with("missing field") {
        "add the key; see the shipped files in scenarios/ for every key with a sensible value"
            .to_string()
    } else if msg.starts_with("unknown variant") {
        "use one of the values listed above".to_string()
    } else if msg.contains("invalid type") {
        "give the value the expected type (see scenarios/ for examples)".to_string()
    } else {
        "fix the TOML syntax at that line".to_string()
    };
    DsoptError::Scenario {
        file: path.into(),
        key,
        line,
        message: msg,
        fix,
    }
}

/// The dotted key (`section.key`) written on the line that holds byte `offset` of `text`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let (k, _) = line.split_once('=')?;
    let k = k.trim().trim_matches('"');
    if k.is_empty() || k.starts_with('[') || k.starts_with('#') {
        return None;
    }
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find_map(|l| l.strip_prefix('[').map(|h| h.trim_end_matches(']').trim()));
    Some(match section {
        Some(sec) if !sec.is_empty() => format!("{sec}.{k}"),
        _ => k.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_line_lookup() {
        let t = "id = 1\n[model]\nhidden = 2\n[run]\nhidden = 3\n";
        assert_eq!(find_key_line(t, "id"), Some(1));
        assert_eq!(find_key_line(t, "model.hidden"), Some(3));
        assert_eq!(find_key_line(t, "run.hidden"), Some(5));
        assert_eq!(find_key_line(t, "run.nothing"), Some(4));
        assert_eq!(find_key_line(t, "nothing"), None);
    }
}
