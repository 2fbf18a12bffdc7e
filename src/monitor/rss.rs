//! 进程常驻内存（RSS）的高水位：操作系统看到的内存，与计数分配器互为印证。
//!
//! Linux only (`/proc/self/status`, `/proc/self/clear_refs`): [`ResidentPeak::start`] hands freed
//! heap pages back to the OS (`malloc_trim` on glibc, so that pages kept from earlier phases do
//! not hide new use), resets the high-water mark `VmHWM` to the current `VmRSS` (writing `5` to
//! `clear_refs`) and keeps that as the baseline; [`ResidentPeak::above_baseline`] is then
//! `VmHWM - baseline`: the most the process held above it since, as the OS counts it (every
//! resident page, code and thread stacks included). Elsewhere both are `None`.

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Current resident set size (bytes).
pub fn current() -> Option<u64> {
    status_bytes("VmRSS")
}

/// Gives free heap pages back to the OS where the C library can (glibc's `malloc_trim`).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the C allocator; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A resident-memory high-water mark measured from a baseline.
#[derive(Debug, Clone, Copy)]
pub struct ResidentPeak {
    baseline: u64,
}

impl ResidentPeak {
    /// Trims the heap, resets the high-water mark and takes the baseline; `None` where the OS
    /// does not offer it.
    pub fn start() -> Option<ResidentPeak> {
        trim_heap();
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        let baseline = current()?;
        Some(ResidentPeak { baseline })
    }

    /// Resets the high-water mark again (to what is resident now), keeping the baseline: the
    /// peak of a later phase, still measured from the first baseline.
    pub fn reset_mark(&self) {
        trim_heap();
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// The baseline (bytes resident at the start).
    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// The high-water mark since the start, above the baseline (bytes).
    pub fn above_baseline(&self) -> Option<u64> {
        Some(status_bytes("VmHWM")?.saturating_sub(self.baseline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's resident memory is shared by every test thread (another test freeing its
    /// buffers between the baseline and the leak hides the leak): the measurement runs alone, in
    /// a child process of this test binary that runs this one test.
    #[test]
    fn a_leaked_buffer_that_was_written_shows_above_the_baseline() {
        const NAME: &str =
            "monitor::rss::tests::a_leaked_buffer_that_was_written_shows_above_the_baseline";
        if std::env::var_os("DSOPT_RSS_CHILD").is_some() {
            return leak_and_measure();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env("DSOPT_RSS_CHILD", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran the test: {text}");
    }

    fn leak_and_measure() {
        let Some(p) = ResidentPeak::start() else {
            eprintln!("no /proc/self/clear_refs here: the resident peak is not measured");
            return;
        };
        let n = 64usize << 20;
        let mut v = vec![0u8; n];
        // write every page so that it is resident (a zeroed allocation may be untouched pages)
        for i in (0..n).step_by(4096) {
            v[i] = 1;
        }
        let leaked: &'static mut [u8] = Vec::leak(v);
        std::hint::black_box(&leaked);
        let above = p.above_baseline().unwrap();
        assert!(above >= n as u64, "{above} < {n}");
        // a budget of half the leak is exceeded
        assert!(above > (n / 2) as u64);
    }
}
