//! Progress bars for the stages: drawn on stderr when it is a terminal, hidden otherwise (tests,
//! CI logs, pipes), so output that is read by programs stays clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Makes the progress bars of one run.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    visible: bool,
}

impl Progress {
    /// Bars that never draw.
    pub fn hidden() -> Self {
        Self { visible: false }
    }

    /// Bars on stderr when it is a terminal.
    pub fn stderr() -> Self {
        Self { visible: std::io::stderr().is_terminal() }
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
