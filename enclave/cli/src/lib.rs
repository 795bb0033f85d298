//! Beside the `enclave` command's own file: `access`, the `enclave access` commands (requests and grants
//! from the host); the demo generator (synthetic provider exports) and the benchmarks
//! (`enclave bench …`, which print figures; `bench_gateway` loads the gateway's Flight SQL listener,
//! `bench_ui` times the web UI's pages). The
//! demo and the benchmarks are not part of the core library: the demo writes only synthetic data, and the
//! benchmarks read rows only of datasets they made (`enclave::baseline`). Everything the commands print
//! goes through [`out!`], so a reader that stops early (`| head`) ends a command quietly.

/// Prints to standard output like `println!` (`out!(no_newline; …)` like `print!`), but a reader that went
/// away (`enclave catalog show … | head`) ends the command quietly instead of panicking: what the command
/// did is done and durable by the time it prints, and nobody reads the rest.
#[macro_export]
macro_rules! out {
    (no_newline; $($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), false)
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), true)
    };
}

/// Writes `args` (and a newline) to standard output for [`out!`]: a closed pipe exits quietly (status
/// 0: the reader chose to stop), any other failure to write exits with an error.
#[doc(hidden)]
pub fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write as _;
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
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

pub mod access;
pub mod bench;
pub mod bench_gateway;
pub mod bench_ui;
pub mod demo;
