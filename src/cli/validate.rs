//! `dsopt validate`: parses and checks scenario files without running them.

use std::path::PathBuf;

use dsopt::config::Scenario;
use dsopt::error::{DsoptError, EXIT_BAD_INPUT, EXIT_PASS};

use super::run::expand;

pub(super) fn validate(paths: &[PathBuf]) -> anyhow::Result<i32> {
    let files = expand(paths);
    if files.is_empty() {
        return Err(DsoptError::Usage("no scenario files found".into()).into());
    }
    let mut code = EXIT_PASS;
    for f in files {
        // a scenario naming a model is checked with that model's dimensions
        let loaded = Scenario::load(&f).and_then(|mut s| {
            let name = f.display().to_string();
            dsopt::checkpoint::apply_model_source(&mut s, None, None, &name)?;
            s.check(&f, None)?;
            Ok(s)
        });
        match loaded {
            Ok(s) => println!("ok    {} ({} {})", f.display(), s.id(), s.kind().as_str()),
            Err(e) => {
                println!("error {e}");
                code = EXIT_BAD_INPUT;
            }
        }
    }
    Ok(code)
}
