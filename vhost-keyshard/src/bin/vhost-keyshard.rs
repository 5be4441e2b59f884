//! `vhost-keyshard`: serves fragment devices over vhost-user until SIGTERM. Exit 0 on a clean
//! stop, 1 on any error (one line on stderr).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vhost_keyshard::daemon::{self, Args, Config};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let level = record.level().as_str().to_ascii_lowercase();
            writeln!(buf, "vhost-keyshard: {level}: {}", record.args())
        })
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version are not errors; a usage error is one line.
        Err(e) if e.use_stderr() => {
            eprintln!(
                "vhost-keyshard: {} (try --help)",
                keyshard_core::usage::one_line(&e.render().to_string())
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match Config::try_from(args)
        .map_err(daemon::DaemonError::from)
        .and_then(daemon::run)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-keyshard: {e}");
            ExitCode::FAILURE
        }
    }
}
