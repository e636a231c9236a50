//! Progress reporting for long commands (convert, compare, check), always on stderr so that
//! stdout keeps only the command's answer.
//!
//! - `-p` on a terminal: a progress bar.
//! - `-p` elsewhere: qemu-img's `    (42.00/100%)` lines, one per whole percent.
//! - `--progress=json`: one JSON object per line, `{"done":N,"total":N,"percent":F}`, one per whole
//!   percent and a last one at 100%, for programs.

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use vmi_convert::{Progress, ProgressFn};

/// How progress is shown (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, qemu-img style percentages otherwise (same as `-p`).
    Human,
    /// JSON lines on stderr.
    Json,
}

/// Flags shared by the commands that report progress.
#[derive(Debug, Clone, clap::Args)]
pub struct ProgressArgs {
    /// Show progress on stderr (a bar on a terminal, percentages otherwise).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Show progress in this form: `human` (as -p) or `json` (lines of
    /// {"done":N,"total":N,"percent":F}).
    #[arg(long = "progress", value_name = "FORM", conflicts_with = "progress")]
    pub progress_mode: Option<ProgressMode>,
}

impl ProgressArgs {
    /// The chosen mode, if any.
    pub fn mode(&self) -> Option<ProgressMode> {
        self.progress_mode
            .or(self.progress.then_some(ProgressMode::Human))
    }
}

enum Sink {
    Bar(ProgressBar),
    Lines,
    Json,
}

struct State {
    sink: Sink,
    /// Last whole percent reported, to print at most one update per percent.
    last: Option<u64>,
}

impl State {
    /// The line to print for `p`, or `None` when the whole percent has not moved since the last.
    fn next_line(&mut self, p: Progress) -> Option<String> {
        let percent = if p.total == 0 {
            100.0
        } else {
            (p.done.min(p.total) as f64) * 100.0 / p.total as f64
        };
        let whole = percent.floor() as u64;
        if self.last.is_some_and(|l| l >= whole) {
            return None;
        }
        self.last = Some(whole);
        Some(match self.sink {
            Sink::Json => serde_json::json!({"done": p.done, "total": p.total, "percent": percent})
                .to_string(),
            _ => format!("    ({percent:.2}/100%)"),
        })
    }
}

/// A progress reporter; [`Reporter::callback`] hands the engine a shareable callback.
#[derive(Clone)]
pub struct Reporter {
    state: Arc<Mutex<State>>,
}

impl Reporter {
    /// A reporter for `mode`, or `None` when no progress was asked for.
    pub fn new(mode: Option<ProgressMode>) -> Option<Reporter> {
        let sink = match mode? {
            ProgressMode::Json => Sink::Json,
            ProgressMode::Human if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::new(100);
                if let Ok(style) = ProgressStyle::with_template(
                    "{wide_bar} {percent:>3}% {binary_bytes}/{binary_total_bytes} ({eta})",
                ) {
                    bar.set_style(style);
                }
                Sink::Bar(bar)
            }
            ProgressMode::Human => Sink::Lines,
        };
        Some(Reporter {
            state: Arc::new(Mutex::new(State { sink, last: None })),
        })
    }

    /// The callback to give the engine.
    pub fn callback(&self) -> ProgressFn {
        let me = self.clone();
        Arc::new(move |p: Progress| me.update(p))
    }

    /// Report `done` of `total` bytes.
    pub fn update(&self, p: Progress) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Sink::Bar(bar) = &st.sink {
            bar.set_length(p.total);
            bar.set_position(p.done.min(p.total));
            return;
        }
        if let Some(line) = st.next_line(p) {
            // Progress is best effort: a closed stderr must not fail the command.
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }

    /// Report completion (100%) and clear a bar.
    pub fn finish(&self, total: u64) {
        self.update(Progress { done: total, total });
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Sink::Bar(bar) = &st.sink {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(sink: Sink) -> State {
        State { sink, last: None }
    }

    #[test]
    fn json_lines_carry_done_total_and_percent() {
        let mut st = state(Sink::Json);
        let line = st.next_line(Progress { done: 1, total: 4 }).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["done"], 1);
        assert_eq!(v["total"], 4);
        assert_eq!(v["percent"], 25.0);
    }

    #[test]
    fn updates_within_the_same_percent_print_once() {
        let mut st = state(Sink::Lines);
        assert_eq!(
            st.next_line(Progress {
                done: 420,
                total: 1000
            })
            .as_deref(),
            Some("    (42.00/100%)")
        );
        assert_eq!(
            st.next_line(Progress {
                done: 425,
                total: 1000
            }),
            None
        );
        assert!(st
            .next_line(Progress {
                done: 1000,
                total: 1000
            })
            .is_some());
    }

    #[test]
    fn an_empty_job_is_complete() {
        let mut st = state(Sink::Json);
        let line = st.next_line(Progress { done: 0, total: 0 }).unwrap();
        assert!(line.contains("\"percent\":100.0"), "{line}");
    }
}
