//! `keyshard-guest`: parses arguments, runs the command, maps errors to exit codes (2: quorum not
//! met, 1: any other error).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use guest_driver::cli::{self, Cli, PROGRAM, error::EXIT_FAILURE};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            let level = record.level().as_str().to_ascii_lowercase();
            writeln!(buf, "{PROGRAM}: {level}: {}", record.args())
        })
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors; every usage error is one line and exits 1, not
        // clap's 2, which means "quorum not met" here.
        Err(e) if e.use_stderr() => {
            let line = keyshard_core::usage::one_line(&e.render().to_string());
            eprintln!("{PROGRAM}: {line} (try --help)");
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
                eprintln!("{PROGRAM}: {line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
