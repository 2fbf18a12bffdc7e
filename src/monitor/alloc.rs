//! 主机内存计数分配器：记录当前与峰值字节数（CPU 后端 flex 下是精确的内存测量）。
//!
//! The library does not install it; the `dsopt` binary does (`#[global_allocator]`), and so
//! can any program that links the library. When it is not installed, readings are `None`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Bytes ever allocated (monotonic): the difference over a stretch of code is what it allocated,
/// freed or not (a hidden copy of a cache shows here even when it is freed at once).
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// 计数全局分配器：包装系统分配器。在二进制中用
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;` 安装。
pub struct CountingAlloc;

#[inline]
fn add(size: usize) {
    ALLOCATED.fetch_add(size, Ordering::Relaxed);
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

#[inline]
fn sub(size: usize) {
    CURRENT.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; we only count bytes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            if !INSTALLED.load(Ordering::Relaxed) {
                INSTALLED.store(true, Ordering::Relaxed);
            }
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        sub(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

/// 预先分配矩阵乘法库的每线程缓冲区，使内存峰值不受线程调度影响。
///
/// gemm (the matmul library under burn-flex) gives each thread that packs a matrix block a
/// buffer the size of the L2 cache (512 KiB on this EPYC), allocated on that thread's first
/// such matmul and kept for the thread's life. Which rayon worker first packs a block inside a
/// measured window is a matter of scheduling: one code change that moved a single call made the
/// SC-001 smoke's absorbed-MLA runtime peak read 56,635 bytes one build and 580,923 the next
/// (exactly 512 KiB more), failing SC-001b on a budget of 1 MiB. Touching the buffer on the
/// calling thread and on every thread of the global pool before any baseline makes it part of
/// the process's fixed cost, as the weights-loaded baseline already treats the binary's own
/// statics.
pub fn settle_thread_locals() {
    let touch = || gemm_common::gemm::L2_SLAB.with(|slab| drop(slab.borrow()));
    touch();
    rayon::broadcast(|_| touch());
}

/// Whether the counting allocator is the process's global allocator.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Bytes currently allocated on the heap (None when the counter is not installed).
pub fn current() -> Option<u64> {
    installed().then(|| CURRENT.load(Ordering::Relaxed) as u64)
}

/// Peak heap bytes since the last [`reset_peak`] (None when not installed).
pub fn peak() -> Option<u64> {
    installed().then(|| PEAK.load(Ordering::Relaxed) as u64)
}

/// Bytes allocated since the process started, freed or not (None when not installed).
pub fn allocated() -> Option<u64> {
    installed().then(|| ALLOCATED.load(Ordering::Relaxed) as u64)
}

/// Starts a new peak window at the current level; returns that level.
pub fn reset_peak() -> Option<u64> {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    installed().then_some(now as u64)
}
