//! Progress bars on stderr (hidden when quiet or when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `total` steps; hidden unless `visible` and stderr is a terminal.
pub fn bar(visible: bool, total: u64, prefix: &str) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(total), target);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// A spinner for a phase of unknown length.
pub fn spinner(visible: bool, msg: &str) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(None, target);
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Milestone lines for logs that are not terminals (CI, remote GPU runs): printed to stderr
/// with the seconds since the first trace when the environment variable `DSOPT_TRACE` is set.
pub fn trace(msg: impl AsRef<str>) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ON: OnceLock<Option<Instant>> = OnceLock::new();
    if let Some(t0) = ON.get_or_init(|| std::env::var_os("DSOPT_TRACE").map(|_| Instant::now())) {
        eprintln!(
            "[dsopt +{:.1}s] {}",
            t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}
