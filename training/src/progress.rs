//! Progress bars for the stages: drawn on stderr when it is a terminal, hidden otherwise (tests,
//! CI logs, pipes), so output that is read by programs stays clean. Long work that is not on a
//! terminal reports through a [`LogTicker`] instead: one plain line per [`LOG_EVERY`], so a
//! non-interactive run is never silent for minutes.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a [`LogTicker`] writes its line.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// Makes the progress bars of one run.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    visible: bool,
    /// Progress lines on stderr for long work (stderr is not a terminal).
    log_lines: bool,
}

impl Progress {
    /// Bars that never draw, and no progress lines.
    pub fn hidden() -> Self {
        Self { visible: false, log_lines: false }
    }

    /// Bars on stderr when it is a terminal; otherwise a progress line per [`LOG_EVERY`] for long
    /// work.
    pub fn stderr() -> Self {
        let terminal = std::io::stderr().is_terminal();
        Self { visible: terminal, log_lines: !terminal }
    }

    /// The line writer for long work named `what` (a no-op where bars draw or nothing should).
    pub fn ticker(&self, what: &str) -> LogTicker {
        LogTicker { what: what.to_owned(), on: self.log_lines, started: Instant::now(), last: None }
    }

    /// A bar counting to `len` items, prefixed by `what`.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), self.target());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:40}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        bar
    }

    /// A spinner for work of unknown length, prefixed by `what`.
    pub fn spinner(&self, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(None, self.target());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} {spinner} {pos} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(what.to_owned());
        if self.visible {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        bar
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() }
    }
}

/// Writes a plain progress line (position, message, elapsed, ETA) to stderr at most once per
/// [`LOG_EVERY`]: the bar's stand-in in logs.
#[derive(Debug)]
pub struct LogTicker {
    what: String,
    on: bool,
    started: Instant,
    last: Option<Instant>,
}

impl LogTicker {
    /// Reports `pos` of `len` done (from `first`, where a resumed run started) with `msg`, if a
    /// line is due.
    pub fn tick(&mut self, pos: u64, first: u64, len: u64, msg: &str) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last.unwrap_or(self.started)) < LOG_EVERY {
            return;
        }
        self.last = Some(now);
        eprintln!("{}", self.line(now.duration_since(self.started), pos, first, len, msg));
    }

    /// The line for `pos` of `len` after `elapsed`; the ETA assumes the pace since `first`.
    fn line(&self, elapsed: Duration, pos: u64, first: u64, len: u64, msg: &str) -> String {
        let done = pos.saturating_sub(first);
        let eta = if done == 0 {
            "?".to_owned()
        } else {
            let left = elapsed.as_secs_f64() / done as f64 * len.saturating_sub(pos) as f64;
            format!("{}s", left.round() as u64)
        };
        format!("{} {pos}/{len} · {msg} · elapsed {}s · eta {eta}", self.what, elapsed.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_has_position_message_elapsed_and_eta() {
        let ticker = Progress::hidden().ticker("train");
        let line = ticker.line(Duration::from_secs(60), 150, 100, 1100, "loss 3.2");
        // 50 steps in 60 s, 950 to go: 1140 s.
        assert_eq!(line, "train 150/1100 · loss 3.2 · elapsed 60s · eta 1140s");
        let line = ticker.line(Duration::from_secs(1), 100, 100, 1100, "");
        assert!(line.ends_with("eta ?"), "{line}");
    }

    #[test]
    fn only_a_run_off_the_terminal_writes_lines() {
        assert!(!Progress::hidden().ticker("x").on);
        let stderr = Progress::stderr();
        assert_eq!(stderr.ticker("x").on, !stderr.visible);
    }
}
