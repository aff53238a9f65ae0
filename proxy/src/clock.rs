//! A coarse clock: whole seconds since start, read with one relaxed atomic load.
//!
//! Idle timeouts need second precision, not a clock read (or a timer re-arm) per
//! request; one background tick per second keeps this current for the whole process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NOW: AtomicU32 = AtomicU32::new(0);

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Seconds since the clock started (at most a second stale).
#[inline]
pub fn now() -> u32 {
    NOW.load(Ordering::Relaxed)
}

/// Keeps the clock ticking; spawn once per process, inside the runtime.
pub async fn run() {
    start();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        NOW.store(start().elapsed().as_secs() as u32, Ordering::Relaxed);
    }
}

/// The wall clock in Unix seconds, for what metrics report as a time (not for
/// measuring: it can step).
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
