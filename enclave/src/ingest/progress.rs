//! Ingest progress on stderr, over the bytes of the input each pass reads: on a terminal a bar with the
//! share done, bytes, rows, an integer rows/s and the time left; otherwise a plain line at most every
//! 5 s; nothing when not wanted.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanCount, HumanDuration, ProgressBar, ProgressStyle};

/// Where a pass is.
pub(super) struct PassState {
    name: String,
    total: u64,
    bytes: u64,
    rows: u64,
    started: Instant,
    shown: Instant,
}

impl PassState {
    fn new(name: &str, total: u64) -> PassState {
        let now = Instant::now();
        PassState {
            name: name.to_owned(),
            total,
            bytes: 0,
            rows: 0,
            started: now,
            shown: now,
        }
    }

    fn rate(&self) -> u64 {
        (self.rows as f64 / self.started.elapsed().as_secs_f64().max(1e-3)) as u64
    }

    /// The time left at the pace so far (`None` before anything is read).
    fn eta(&self) -> Option<Duration> {
        let done = self.bytes.min(self.total);
        (done > 0).then(|| {
            let per_byte = self.started.elapsed().as_secs_f64() / done as f64;
            Duration::from_secs_f64(per_byte * (self.total - done) as f64)
        })
    }

    fn line(&self) -> String {
        let percent = 100 * self.bytes.min(self.total) / self.total.max(1);
        format!(
            "{}: {percent} % of {}, {} rows, {} rows/s, {} left",
            self.name,
            HumanBytes(self.total),
            HumanCount(self.rows),
            HumanCount(self.rate()),
            self.eta()
                .map_or_else(|| "time".to_owned(), |d| HumanDuration(d).to_string())
        )
    }
}

/// Progress on stderr.
pub(super) enum Progress {
    Bar(ProgressBar, RefCell<PassState>),
    Lines(RefCell<PassState>),
    Off,
}

impl Progress {
    pub(super) fn new(wanted: bool) -> Progress {
        if !wanted {
            return Progress::Off;
        }
        let pass = RefCell::new(PassState::new("", 0));
        if !std::io::stderr().is_terminal() {
            return Progress::Lines(pass);
        }
        let pb = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:28}] {percent:>3}% {binary_bytes}/{binary_total_bytes} · {msg} · {eta} left",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar(pb, pass)
    }

    /// A new pass that reads `total_bytes` of input.
    pub(super) fn phase(&self, name: &str, total_bytes: u64) {
        match self {
            Progress::Bar(pb, pass) => {
                *pass.borrow_mut() = PassState::new(name, total_bytes);
                pb.reset();
                pb.set_length(total_bytes);
                pb.set_prefix(name.to_owned());
                pb.set_message("0 rows");
            }
            Progress::Lines(pass) => {
                *pass.borrow_mut() = PassState::new(name, total_bytes);
                eprintln!("{name}: {} to read", HumanBytes(total_bytes));
            }
            Progress::Off => {}
        }
    }

    /// `rows` more rows read; the pass is at `bytes` of its input.
    pub(super) fn tick(&self, bytes: u64, rows: u64) {
        let (Progress::Bar(_, pass) | Progress::Lines(pass)) = self else {
            return;
        };
        let mut p = pass.borrow_mut();
        p.rows += rows;
        p.bytes = p.bytes.max(bytes);
        let every = match self {
            Progress::Bar(..) => Duration::from_millis(250),
            _ => Duration::from_secs(5),
        };
        if p.shown.elapsed() < every {
            return;
        }
        p.shown = Instant::now();
        match self {
            Progress::Bar(pb, _) => {
                pb.set_position(p.bytes.min(p.total));
                pb.set_message(format!(
                    "{} rows · {} rows/s",
                    HumanCount(p.rows),
                    HumanCount(p.rate())
                ));
            }
            _ => eprintln!("{}", p.line()),
        }
    }

    pub(super) fn finish(&self) {
        match self {
            Progress::Bar(pb, _) => pb.finish_and_clear(),
            Progress::Lines(pass) => {
                let p = pass.borrow();
                eprintln!(
                    "{}: done, {} rows, {} rows/s",
                    p.name,
                    HumanCount(p.rows),
                    HumanCount(p.rate())
                );
            }
            Progress::Off => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_share_rows_integer_rate_and_time_left() {
        let mut p = PassState::new("pass 2/2: de-identifying", 2 * 1024 * 1024 * 1024);
        p.bytes = 512 * 1024 * 1024;
        p.rows = 1_234_567;
        let line = p.line();
        assert!(
            line.starts_with("pass 2/2: de-identifying: 25 % of 2.00 GiB, 1,234,567 rows, "),
            "{line}"
        );
        let rate = line.split(", ").nth(2).expect("rate");
        assert!(
            rate.ends_with(" rows/s") && !rate.contains('.'),
            "an integer rate: {rate}"
        );
        assert!(line.ends_with(" left"), "{line}");
        let empty = PassState::new("x", 0);
        assert!(
            empty.line().starts_with("x: 0 % of 0 B"),
            "{}",
            empty.line()
        );
    }
}
