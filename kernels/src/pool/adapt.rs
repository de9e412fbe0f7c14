//! The adaptive thread count: fewer threads while parallel sections spend much of their time
//! waiting for late threads (other processes hold the cores), all of them again once a trial
//! with one more thread runs clean.
//!
//! A pure policy over the timings the pool feeds it, so tests drive it with synthetic ones.
//! Outputs never depend on it: the kernels' results are the same for every thread count.

use std::time::Duration;

/// Section time that makes one window of evidence.
const WINDOW: Duration = Duration::from_millis(2);
/// Sections that make one window, at least.
const WINDOW_SECTIONS: u32 = 8;
/// Section time a trial with one more thread must run clean before the count stays up.
const TRIAL: Duration = Duration::from_millis(20);
/// Above this share of section time spent waiting for other threads' chunks, a thread is dropped.
const MAX_WAIT_SHARE: f64 = 0.25;
/// Time before the first trial after a drop; doubled after each failed trial up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest time between trials while the cores stay busy.
const MAX_BACKOFF: Duration = Duration::from_millis(3200);

/// The thread-count policy: a cap, the count in use, and the evidence of the current window.
#[derive(Debug, Clone)]
pub struct Policy {
    cap: usize,
    adaptive: bool,
    threads: usize,
    section: Duration,
    wait: Duration,
    sections: u32,
    /// Set while running a trial with one more thread: the window is [`TRIAL`] long.
    trial: bool,
    backoff: Duration,
    /// When (time since the pool started) to try one more thread.
    next_trial: Duration,
    drops: u64,
}

impl Policy {
    /// A policy over `cap` threads (at least one), adaptive, starting with all of them.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            cap,
            adaptive: true,
            threads: cap,
            section: Duration::ZERO,
            wait: Duration::ZERO,
            sections: 0,
            trial: false,
            backoff: MIN_BACKOFF,
            next_trial: Duration::ZERO,
            drops: 0,
        }
    }

    /// Caps the count at `cap` threads (at least one); the count in use drops to it at once.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.threads = self.threads.min(self.cap);
        if !self.adaptive {
            self.threads = self.cap;
        }
        self.reset_window();
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Turns adaptation on or off; off, the count is the cap.
    pub fn set_adaptive(&mut self, adaptive: bool) {
        self.adaptive = adaptive;
        if !adaptive {
            self.threads = self.cap;
            self.trial = false;
        }
        self.reset_window();
    }

    /// Whether the count adapts.
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    /// Times the count was lowered so far.
    pub fn drops(&self) -> u64 {
        self.drops
    }

    /// The thread count in use now.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The count to use for a section starting at `now` (time since the pool started): the
    /// current one, or one more when a trial is due.
    pub fn threads_at(&mut self, now: Duration) -> usize {
        if self.adaptive && !self.trial && self.threads < self.cap && now >= self.next_trial {
            self.threads += 1;
            self.trial = true;
            self.reset_window();
        }
        self.threads
    }

    /// Records a section that ran on `threads` threads for `section`, of which the caller spent
    /// `waited` waiting for chunks other threads had claimed, ending at `now`.
    pub fn record(&mut self, threads: usize, section: Duration, waited: Duration, now: Duration) {
        if !self.adaptive || threads != self.threads || threads <= 1 {
            return;
        }
        self.section += section;
        self.wait += waited.min(section);
        self.sections += 1;
        let window = if self.trial { TRIAL } else { WINDOW };
        if self.section < window || self.sections < WINDOW_SECTIONS {
            return;
        }
        let share = self.wait.as_secs_f64() / self.section.as_secs_f64();
        let trial = std::mem::replace(&mut self.trial, false);
        self.reset_window();
        if share > MAX_WAIT_SHARE {
            self.backoff = if trial { (self.backoff * 2).min(MAX_BACKOFF) } else { MIN_BACKOFF };
            self.threads -= 1;
            self.drops += 1;
            self.next_trial = now + self.backoff;
        } else if trial {
            // A clean trial: the cores are free again; try the next thread soon.
            self.backoff = MIN_BACKOFF;
            self.next_trial = now + MIN_BACKOFF;
        }
    }

    fn reset_window(&mut self) {
        self.section = Duration::ZERO;
        self.wait = Duration::ZERO;
        self.sections = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);
    const MS: Duration = Duration::from_millis(1);

    /// Feeds `n` sections of `section` each with `waited` of waiting, one every `section`,
    /// starting at `*now`, asking for the count before each as the pool does.
    fn feed(p: &mut Policy, n: u32, section: Duration, waited: Duration, now: &mut Duration) {
        for _ in 0..n {
            let threads = p.threads_at(*now);
            *now += section;
            p.record(threads, section, waited, *now);
        }
    }

    #[test]
    fn quiet_sections_keep_every_thread() {
        let mut p = Policy::new(2);
        let mut now = Duration::ZERO;
        feed(&mut p, 10_000, 50 * US, 2 * US, &mut now);
        assert_eq!((p.threads(), p.drops()), (2, 0));
    }

    #[test]
    fn late_workers_drop_a_thread_and_trials_back_off_while_the_load_lasts() {
        let mut p = Policy::new(2);
        let mut now = Duration::ZERO;
        // A descheduled worker: the caller waits most of each section.
        feed(&mut p, 40, 400 * US, 300 * US, &mut now);
        assert_eq!(p.threads(), 1);
        // Busy: each trial with two threads fails again, and the trials grow rarer.
        let mut trials = Vec::new();
        for _ in 0..6 {
            let before = now;
            while p.threads_at(now) == 1 {
                now += MS;
            }
            trials.push(now - before);
            feed(&mut p, 60, 400 * US, 300 * US, &mut now);
            assert_eq!(p.threads(), 1);
        }
        assert!(trials.windows(2).all(|w| w[1] >= w[0]), "{trials:?}");
        assert!(*trials.last().unwrap_or(&MS) >= MAX_BACKOFF - 10 * MS, "{trials:?}");
    }

    #[test]
    fn all_threads_return_once_the_cores_free_up() {
        let mut p = Policy::new(4);
        let mut now = Duration::ZERO;
        for _ in 0..3 {
            feed(&mut p, 40, 400 * US, 300 * US, &mut now);
        }
        assert_eq!(p.threads(), 1);
        // Quiet again: trials succeed one thread at a time.
        for _ in 0..200 {
            now += 10 * MS;
            feed(&mut p, 500, 50 * US, 2 * US, &mut now);
        }
        assert_eq!(p.threads(), 4);
    }

    #[test]
    fn the_cap_bounds_the_count_and_adaptation_can_be_off() {
        let mut p = Policy::new(8);
        p.set_cap(3);
        let mut now = Duration::ZERO;
        assert_eq!(p.threads_at(now), 3);
        p.set_adaptive(false);
        feed(&mut p, 100, 400 * US, 390 * US, &mut now);
        assert_eq!(p.threads(), 3);
        p.set_cap(0);
        assert_eq!((p.cap(), p.threads()), (1, 1));
    }

    #[test]
    fn short_bursts_of_waiting_within_a_window_below_the_share_keep_the_count() {
        let mut p = Policy::new(2);
        let mut now = Duration::ZERO;
        // One slow section in forty: under the share.
        for _ in 0..50 {
            feed(&mut p, 39, 100 * US, 5 * US, &mut now);
            feed(&mut p, 1, 100 * US, 60 * US, &mut now);
        }
        assert_eq!(p.threads(), 2);
    }
}
