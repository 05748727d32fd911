//! An opt-in breakdown of a forward pass by operator class (issue 16's "measure first"): the
//! leaf layers ([`crate::conv::Conv2d`], [`crate::blocks::Linear`], attention, the norms) time
//! themselves into process-wide totals while [`enable`]d; `bench-denoiser-step --profile`
//! prints them next to the whole step, the rest being element-wise work and copies.
//!
//! Wall-clock time on the calling thread: right on the CPU, where candle's ops finish before
//! they return; meaningless on CUDA, where they are queued. Off (one relaxed atomic load per
//! layer call) unless enabled.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) collecting; collected totals stay until [`take`].
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The totals so far, by class: (seconds, calls). Clears them.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *totals)
        .into_iter()
        .map(|(class, (time, calls))| (class, time.as_secs_f64(), calls))
        .collect()
}

/// Times until dropped, into `class`, when enabled.
pub struct Scope {
    class: &'static str,
    started: Option<Instant>,
}

pub fn scope(class: &'static str) -> Scope {
    Scope {
        class,
        started: ENABLED.load(Ordering::Relaxed).then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(self.class).or_default();
            entry.0 += started.elapsed();
            entry.1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_add_up_while_enabled_only() {
        {
            let _off = scope("profile test class");
        }
        enable(true);
        for _ in 0..2 {
            let _on = scope("profile test class");
            std::thread::sleep(Duration::from_millis(2));
        }
        enable(false);
        {
            let _off = scope("profile test class");
        }
        let totals = take();
        let (_, seconds, calls) = totals
            .iter()
            .find(|t| t.0 == "profile test class")
            .expect("the class was timed");
        assert_eq!(*calls, 2);
        assert!(*seconds >= 0.004, "{seconds}");
        assert!(!take().iter().any(|t| t.0 == "profile test class"));
    }
}
