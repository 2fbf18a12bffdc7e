//! The counting allocator sees a known allocation (installed here as in the binary).

use dsopt::monitor::alloc;

#[global_allocator]
static A: alloc::CountingAlloc = alloc::CountingAlloc;

#[test]
fn peak_rises_by_at_least_a_known_allocation() {
    let warm = Box::new([0u8; 16]);
    std::hint::black_box(&warm);
    assert!(alloc::installed());
    let before = alloc::reset_peak().unwrap();
    let size = 32 * 1024 * 1024;
    let v = vec![1u8; size];
    let peak = alloc::peak().unwrap();
    assert!(peak >= before + size as u64, "peak {peak} before {before}");
    let during = alloc::current().unwrap();
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
