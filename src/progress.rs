//! Progress of a run on a terminal: a bar on stderr, refreshed from the run's counters.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use pinazu_coordinator::RunStats;

/// Draws a progress bar for `stats` until the returned guard is dropped. Nothing is
/// drawn when stderr is not a terminal or `enabled` is false.
pub(crate) fn show(stats: Arc<RunStats>, enabled: bool) -> Option<Guard> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tasks {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let task = tokio::spawn(async move {
        loop {
            let snap = stats.snapshot();
            b.set_length(snap.tasks);
            b.set_position(stats.completed());
            b.set_message(format!(
                "({} cache hits, {} retries)",
                snap.cache_hits, snap.retries
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Some(Guard { bar, task })
}

/// Stops and clears the bar when dropped.
pub(crate) struct Guard {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
