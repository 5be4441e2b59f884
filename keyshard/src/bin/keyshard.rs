//! `keyshard`: parses arguments, runs the command, maps errors to exit codes (2: quorum not met,
//! 1: any other error).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use keyshard::cli::{self, Cli, error::EXIT_FAILURE};

fn main() -> ExitCode {
    // libtss2 prints every refused TPM command to stderr, refusals keyshard expects and reports
    // itself included; keep it quiet unless the user asked for its logging.
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: main is still single-threaded here: nothing reads the environment concurrently.
        unsafe { std::env::set_var("TSS2_LOG", "all+NONE") };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            let level = record.level().as_str().to_ascii_lowercase();
            writeln!(buf, "keyshard: {level}: {}", record.args())
        })
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors; every usage error is one line and exits 1, not
        // clap's 2.
        Err(e) if e.use_stderr() => {
            eprintln!("keyshard: {} (try --help)", cli::usage_error_line(&e));
            return ExitCode::from(EXIT_FAILURE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.report() {
                eprintln!("keyshard: {line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
