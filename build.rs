// Records the git commit this binary was built from (absent outside a git checkout), with
// "-dirty" when tracked files differ from that commit: a report must not name a commit whose
// code it did not run.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
}

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=.git/index");
    // an edit to the sources changes the dirty state too
    println!("cargo:rerun-if-changed=src");
    let mut commit = git(&["rev-parse", "--short=12", "HEAD"])
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.trim().is_empty());
    if !commit.is_empty() && dirty {
        commit.push_str("-dirty");
    }
    println!("cargo:rustc-env=DSOPT_GIT_COMMIT={commit}");
}
