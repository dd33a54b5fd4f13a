//! The executor the engine runs on: a tokio current-thread runtime with a
//! `LocalSet`, so a request is popped, mapped, submitted, reaped and
//! completed on one thread, next to that thread's io_uring.

use std::future::Future;

/// Runs `fut` to completion on a new current-thread runtime and `LocalSet`,
/// with this thread's io_uring available through
/// [`crate::uring::Ring::current`]. The ring is retired (after its in-flight
/// operations complete) before this returns.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .expect("building a current-thread tokio runtime");
    let local = tokio::task::LocalSet::new();
    crate::uring::retire_current();
    let out = local.block_on(&rt, fut);
    crate::uring::retire_current();
    out
}
