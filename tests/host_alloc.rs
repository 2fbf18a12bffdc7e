//! The counting allocator sees a known allocation (installed here as in the binary).

use std::sync::Mutex;

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use dsopt::monitor::alloc;

/// The tests read process-wide counters: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[global_allocator]
static A: alloc::CountingAlloc = alloc::CountingAlloc;

#[test]
fn peak_rises_by_at_least_a_known_allocation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let warm = Box::new([0u8; 16]);
    std::hint::black_box(&warm);
    assert!(alloc::installed());
    let before = alloc::reset_peak().unwrap();
    let size = 32 * 1024 * 1024;
    let v = vec![1u8; size];
    let during = alloc::current().unwrap();
    let peak = alloc::peak().unwrap();
    // the peak holds the level with the allocation in it; compared with the current level, not
    // with `before + size`: the pool threads of an earlier test may still be freeing buffers
    // (up to 2.1 MB seen on a 2-core Xeon), which lowers both
    assert!(
        peak >= during && during >= size as u64,
        "peak {peak}, current {during}, before {before}"
    );
    drop(v);
    let after = alloc::current().unwrap();
    assert!(
        during - after >= size as u64 - 1024,
        "freed bytes are subtracted"
    );
    // a new window starts at the current level
    let base = alloc::reset_peak().unwrap();
    assert!(alloc::peak().unwrap() < base + size as u64);
}

#[test]
fn matmul_thread_buffers_exist_before_a_measured_window() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Default::default();
    let a = Tensor::<Flex, 2>::random([512, 1024], Distribution::Default, &dev);
    let b = Tensor::<Flex, 2>::random([1024, 512], Distribution::Default, &dev);
    // (DSOPT_TEST_NO_SETTLE=1 leaves the call out, to watch this test fail)
    if std::env::var_os("DSOPT_TEST_NO_SETTLE").is_none() {
        alloc::settle_thread_locals();
    }
    // the same matmul twice: the first no longer leaves per-thread packing buffers behind, so
    // both allocate the same bytes but a few of the pool's job bookkeeping (without the call
    // above the first allocated 1.41 MB more on this 2-thread EPYC, whose buffers are 512 KiB)
    let mut bytes = Vec::new();
    for _ in 0..2 {
        let before = alloc::allocated().unwrap();
        let c = a.clone().matmul(b.clone());
        std::hint::black_box(c.into_data());
        bytes.push(alloc::allocated().unwrap() - before);
    }
    assert!(
        bytes[0].abs_diff(bytes[1]) < 65536,
        "bytes allocated by two equal matmuls: {bytes:?}"
    );
}
