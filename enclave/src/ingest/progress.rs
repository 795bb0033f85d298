//! Ingest progress on stderr: a bar on a terminal, plain lines otherwise, nothing when not wanted.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Progress on stderr: an indicatif bar on a terminal, plain lines (at most every 5 s) otherwise.
pub(super) enum Progress {
    Bar(ProgressBar),
    Lines {
        phase: std::cell::RefCell<(String, u64, Instant, Instant)>,
    },
    Off,
}

impl Progress {
    pub(super) fn new(wanted: bool) -> Progress {
        if !wanted {
            return Progress::Off;
        }
        if !std::io::stderr().is_terminal() {
            let now = Instant::now();
            return Progress::Lines {
                phase: std::cell::RefCell::new((String::new(), 0, now, now)),
            };
        }
        let pb = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {msg}: {human_pos} rows, {per_sec}, {elapsed}")
        {
            pb.set_style(style);
        }
        pb.enable_steady_tick(Duration::from_millis(120));
        Progress::Bar(pb)
    }

    pub(super) fn phase(&self, name: &str) {
        match self {
            Progress::Bar(pb) => {
                pb.set_position(0);
                pb.set_message(name.to_owned());
            }
            Progress::Lines { phase } => {
                let now = Instant::now();
                *phase.borrow_mut() = (name.to_owned(), 0, now, now);
                eprintln!("{name}");
            }
            Progress::Off => {}
        }
    }

    pub(super) fn tick(&self, rows: u64) {
        match self {
            Progress::Bar(pb) => pb.inc(rows),
            Progress::Lines { phase } => {
                let mut p = phase.borrow_mut();
                p.1 += rows;
                if p.3.elapsed() >= Duration::from_secs(5) {
                    p.3 = Instant::now();
                    let rate = p.1 as f64 / p.2.elapsed().as_secs_f64().max(1e-9);
                    eprintln!("{}: {} rows, {rate:.0} rows/s", p.0, p.1);
                }
            }
            Progress::Off => {}
        }
    }

    pub(super) fn finish(&self) {
        if let Progress::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
