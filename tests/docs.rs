//! The documentation's promises, checked: the recipes it marks as tested give the exit codes it
//! states, the example reports it ships still load, and its relative links lead somewhere.
//!
//! Convention for README.md and docs/*.md:
//! - A fenced code block whose info string contains the word `tested` (written ```` ```bash tested ````;
//!   renderers use only the first word for highlighting) is run by this test. Every other block
//!   is left alone: `cargo test` itself, the CUDA build, coverage, the GPU check and full-size
//!   benchmarks are never marked.
//! - Each line of a tested block is one command for `sh -c`; a line ending in `\` continues on the
//!   next; blank lines and lines starting with `#` are skipped.
//! - A command's expected exit code is written at the end of the line as `# exit N` (any text
//!   may follow); a command without it must exit 0.
//! - `dsopt` is the binary cargo built for this test run (`CARGO_BIN_EXE_dsopt`), put first on
//!   `PATH`; a leading `cargo run --release --` is replaced by `dsopt` (no other `cargo` command
//!   may be marked).
//! - The tested blocks of one document run in order, in one fresh temporary directory that holds
//!   copies of the repository's `scenarios/`, `docs/examples/` and `tests/fixtures/models/`, so
//!   that `scenarios/smoke/...`, `docs/examples/...`, `tests/fixtures/models/...` and `reports/`
//!   mean what they mean at the repository root. The MTP
//!   checkpoint cache (`DSOPT_CACHE`) is inside that directory too.
//! - Only commands that finish in seconds may be marked: smoke scenarios, with `--backend flex`
//!   wherever a backend is chosen, and exit codes that do not depend on measured speed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One command of a tested block.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    /// 1-based line of the command in its document.
    line: usize,
    /// The command as `sh -c` runs it.
    command: String,
    /// The exit code the document promises.
    exit: i32,
}

/// The commands of every tested block of `markdown`, in order.
fn tested_steps(markdown: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let mut fence: Option<bool> = None; // Some(tested?) inside a code block
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in markdown.lines().enumerate() {
        let trimmed = raw.trim();
        if let Some(info) = trimmed.strip_prefix("```") {
            fence = match fence {
                None => Some(info.split_whitespace().any(|w| w == "tested")),
                Some(_) => {
                    if pending.is_some() {
                        return Err(format!("line {}: a `\\` continues past the block", i + 1));
                    }
                    None
                }
            };
            continue;
        }
        if fence != Some(true) {
            continue;
        }
        let (line, mut text) = match pending.take() {
            Some((line, before)) => (line, before + " " + trimmed),
            None => (i + 1, trimmed.to_string()),
        };
        if let Some(head) = text.strip_suffix('\\') {
            pending = Some((line, head.trim_end().to_string()));
            continue;
        }
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if let Some(rest) = text.strip_prefix("cargo run --release -- ") {
            text = format!("dsopt {rest}");
        }
        if text.starts_with("cargo ") {
            return Err(format!(
                "line {line}: `{text}`: a cargo command cannot be marked tested"
            ));
        }
        let exit = expected_exit(&text).map_err(|e| format!("line {line}: {e}"))?;
        steps.push(Step {
            line,
            command: text,
            exit,
        });
    }
    if fence.is_some() {
        return Err("a code block is not closed".into());
    }
    Ok(steps)
}

/// The `# exit N` at the end of a command (0 when there is none).
fn expected_exit(command: &str) -> Result<i32, String> {
    let Some(at) = command.find("# exit") else {
        return Ok(0);
    };
    let digits: String = command[at + "# exit".len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .map_err(|_| format!("`{command}`: `# exit` must be followed by a number"))
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every file under `dir` (recursively), sorted; none when `dir` does not exist.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// README.md and every docs/*.md (not the generated reports under docs/examples/).
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md")];
    docs.extend(
        files_under(&repo().join("docs"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .filter(|p| p.parent() == Some(repo().join("docs").as_path())),
    );
    docs
}

/// Runs the tested blocks of `doc` as the convention above says; returns how many commands ran.
#[cfg(unix)]
fn run_document(doc: &Path) -> usize {
    let name = doc
        .strip_prefix(repo())
        .unwrap_or(doc)
        .display()
        .to_string();
    let text = std::fs::read_to_string(doc).unwrap();
    let steps = tested_steps(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    if steps.is_empty() {
        return 0;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&repo().join("scenarios"), &dir.path().join("scenarios"));
    for sub in ["docs/examples", "tests/fixtures/models"] {
        if repo().join(sub).is_dir() {
            copy_tree(&repo().join(sub), &dir.path().join(sub));
        }
    }
    let bin = dir.path().join(".bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dsopt"), bin.join("dsopt")).unwrap();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    for step in &steps {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&step.command)
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("DSOPT_CACHE", dir.path().join(".dsopt-cache"))
            .env_remove("CUBECL_WGPU_DEFAULT_DEVICE")
            .env_remove("DSOPT_TRACE")
            .output()
            .unwrap();
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let start = s.len().saturating_sub(4000);
            let start = (start..s.len())
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            s[start..].to_string()
        };
        assert_eq!(
            out.status.code(),
            Some(step.exit),
            "{name}:{}: `{}` promises exit {}\n--- stdout\n{}\n--- stderr\n{}",
            step.line,
            step.command,
            step.exit,
            tail(&out.stdout),
            tail(&out.stderr)
        );
    }
    steps.len()
}

#[test]
fn the_convention_reads_blocks_commands_and_exit_codes() {
    let md = "text\n\
              ```bash tested\n\
              # a comment line\n\
              cargo run --release -- info          # shows the backends\n\
              dsopt gate a.json \\\n\
              \x20 b.json   # exit 1: one failed\n\
              \n\
              ```\n\
              ```bash\n\
              cargo test --release\n\
              ```\n";
    let steps = tested_steps(md).unwrap();
    assert_eq!(
        steps,
        [
            Step {
                line: 4,
                command: "dsopt info          # shows the backends".into(),
                exit: 0
            },
            Step {
                line: 5,
                command: "dsopt gate a.json b.json   # exit 1: one failed".into(),
                exit: 1
            },
        ]
    );
    assert!(tested_steps("```bash tested\ncargo build --release\n```\n").is_err());
    assert!(tested_steps("```bash tested\ndsopt gate x # exit\n```\n").is_err());
    assert!(tested_steps("```bash tested\ndsopt info\n").is_err());
}

#[test]
#[cfg(unix)]
fn the_readme_recipes_give_the_exit_codes_it_promises() {
    let ran = run_document(&repo().join("README.md"));
    assert!(ran > 0, "README.md has no tested block");
}

#[test]
#[cfg(unix)]
fn the_docs_recipes_give_the_exit_codes_they_promise() {
    let mut ran = Vec::new();
    for doc in documents().into_iter().skip(1) {
        let n = run_document(&doc);
        ran.push((doc.file_name().unwrap().to_string_lossy().to_string(), n));
    }
    // the CI recipe of the gate document is the one a user copies: it must stay tested
    let gate = ran.iter().find(|(d, _)| d == "gate.md");
    assert!(gate.is_some_and(|(_, n)| *n > 0), "{ran:?}");
}

#[test]
fn the_example_reports_load_with_the_current_schema() {
    use dsopt::report::gate;
    let examples = repo().join("docs/examples");
    let json: Vec<PathBuf> = files_under(&examples)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    let mut kinds = Vec::new();
    for p in &json {
        let rel = p.strip_prefix(&examples).unwrap().display().to_string();
        if let Some(kind) = gate::aggregate_kind(p) {
            // summaries and the like: JSON of this schema version, not single-run reports
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            assert_eq!(
                v["schema_version"],
                dsopt::report::SCHEMA_VERSION,
                "{rel} ({kind})"
            );
            kinds.push((rel, kind));
            continue;
        }
        let report = gate::load(p).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let kind = report.scenario["kind"].as_str().unwrap_or("?").to_string();
        kinds.push((rel, kind));
    }
    // what the README and the docs show: the default MLA run and the smoke run with its summary
    let has = |dir: &str, kind: &str| {
        kinds
            .iter()
            .any(|(rel, k)| rel.starts_with(dir) && k == kind)
    };
    assert!(has("bench-mla/", "mla"), "{kinds:?}");
    assert!(has("run-smoke/", "summary"), "{kinds:?}");
    for kind in ["calibrate", "mla", "mtp", "moe", "model"] {
        assert!(has("run-smoke/", kind), "run-smoke lacks {kind}: {kinds:?}");
    }
}

#[test]
fn relative_links_in_the_docs_lead_to_files() {
    let mut docs = documents();
    docs.push(repo().join("docs/examples/README.md"));
    let mut broken = Vec::new();
    for doc in &docs {
        let Ok(text) = std::fs::read_to_string(doc) else {
            broken.push(format!("{} is missing", doc.display()));
            continue;
        };
        let mut in_code = false;
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if in_code {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                rest = &rest[at + 2..];
                let end = rest.find([')', ' ']).unwrap_or(rest.len());
                let target = &rest[..end];
                rest = &rest[end..];
                let file = target.split('#').next().unwrap_or("");
                if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                    continue;
                }
                let resolved = doc.parent().unwrap().join(file);
                if !resolved.exists() {
                    broken.push(format!("{}:{}: {target}", doc.display(), i + 1));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to nothing:\n{}",
        broken.join("\n")
    );
}
