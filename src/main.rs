//! `dsopt` command line: parse, run, map errors to exit codes.

mod cli;

/// Counts host heap bytes for the report's `host_peak_bytes` (exact for the CPU backend, flex).
#[global_allocator]
static ALLOC: dsopt::monitor::alloc::CountingAlloc = dsopt::monitor::alloc::CountingAlloc;

fn main() {
    quiet_mesa();
    std::process::exit(cli::main());
}

/// Mesa's Vulkan loader prints "XDG_RUNTIME_DIR is invalid or not set" on every start when the
/// variable is missing (CI, ssh, containers); give it a private folder so stderr stays readable.
fn quiet_mesa() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dsopt-xdg-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // single-threaded here: nothing else reads the environment yet
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}
