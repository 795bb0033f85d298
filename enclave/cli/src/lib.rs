//! Beside the `enclave` command's own file: `access`, the `enclave access` commands (requests and grants
//! from the host); the demo generator (synthetic provider exports) and the benchmarks
//! (`enclave bench …`, which print figures; `bench_gateway` loads the gateway's Flight SQL listener,
//! `bench_ui` times the web UI's pages). The
//! demo and the benchmarks are not part of the core library: the demo writes only synthetic data, and the
//! benchmarks read rows only of datasets they made (`enclave::baseline`). Everything the commands print
//! goes through [`out!`], so a reader that stops early (`| head`) cannot make a command panic or stop
//! half done.

/// Prints to standard output like `println!` (`out!(no_newline; …)` like `print!`), but never panics: once
/// the output cannot be written (its reader went away, as in `enclave catalog show … | head`, or the disk
/// is full), the rest is dropped and the command still runs to its end — a data directory half made or
/// a server that stops because nobody reads its log would be worse. [`output_lost`] then tells `main`
/// to say so and exit non-zero.
#[macro_export]
macro_rules! out {
    (no_newline; $($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), false)
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), true)
    };
}

/// 0: the output is whole; 1: its reader went away (a closed pipe); 2: it could not be written.
static OUTPUT_LOST: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Writes `args` (and a newline) to standard output for [`out!`], unless output was already lost.
#[doc(hidden)]
pub fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;
    if OUTPUT_LOST.load(Ordering::Relaxed) != 0 {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        let why = if e.kind() == std::io::ErrorKind::BrokenPipe {
            1
        } else {
            2
        };
        OUTPUT_LOST.store(why, Ordering::Relaxed);
    }
}

/// Why some of the command's output was not delivered, if it was not: `Some(true)` when its reader went
/// away (a closed pipe), `Some(false)` when it could not be written.
pub fn output_lost() -> Option<bool> {
    match OUTPUT_LOST.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n == 1),
    }
}

pub mod access;
pub mod bench;
pub mod bench_gateway;
pub mod bench_ui;
pub mod demo;
