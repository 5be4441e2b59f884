//! `keyshard-guest read`: each fragment device's serial and what its fragments say about
//! themselves, never their share bytes; and which broker mailbox there is (not asked anything).

use keyshard_core::fragment::Fragment;

use super::sources::BrokerSelection;
use super::sources::{SourceArgs, SourceConfig};
use super::{CliError, PROGRAM};
use crate::agent;
use crate::broker::mailbox::MailboxSpec;
use crate::source::SourceReport;
use crate::worker::WorkerLauncher;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub sources: SourceArgs,
}

#[derive(Debug)]
pub struct Config {
    pub sources: SourceConfig,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        Ok(Self {
            sources: args.sources.try_into()?,
        })
    }
}

/// What to print about one source: lines for stdout, and problems for stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub lines: Vec<String>,
    pub problems: Vec<String>,
}

/// Describes one source: its serial, then one line per fragment.
pub fn list(report: &SourceReport) -> Listing {
    let mut listing = Listing::default();
    let serial = report.serial.as_deref().unwrap_or("unknown");
    let fragments = match &report.fragments {
        Ok(fragments) => fragments,
        Err(why) => {
            listing
                .lines
                .push(format!("{}: serial {serial}, unreadable", report.location));
            listing.problems.push(format!("{}: {why}", report.name()));
            return listing;
        }
    };
    let count = match fragments.len() {
        1 => "1 fragment".to_owned(),
        n => format!("{n} fragments"),
    };
    listing
        .lines
        .push(format!("{}: serial {serial}, {count}", report.location));
    for (number, bytes) in (1..).zip(fragments) {
        match Fragment::parse(bytes) {
            Ok(fragment) => {
                let h = fragment.header();
                listing.lines.push(format!(
                    "  #{number}: key {} epoch {} share {} of {} (k = {}), {} holder {}, {}-byte share, kcv {}",
                    h.key_id,
                    h.epoch,
                    h.index,
                    h.threshold.n(),
                    h.threshold.k(),
                    h.class,
                    h.holder_id,
                    fragment.share_len(),
                    h.kcv.to_hex()
                ));
            }
            Err(e) => {
                listing.lines.push(format!("  #{number}: unparseable"));
                listing
                    .problems
                    .push(format!("{} #{number}: unparseable: {e}", report.name()));
            }
        }
    }
    listing
}

/// The line that names the broker mailbox: its location, and its serial when discovery found it.
pub fn broker_line(broker: &MailboxSpec) -> String {
    match broker {
        MailboxSpec::Device {
            serial: Some(serial),
            ..
        } => format!("{}: serial {serial}, broker mailbox", broker.location()),
        _ => format!("{}: broker mailbox", broker.location()),
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let launcher = WorkerLauncher::this_program();
    let mut inputs = config.sources.inputs(&launcher, false);
    // Listed, not asked: the broker is only named.
    let named_broker = match &config.sources.broker {
        BrokerSelection::Named(spec) => Some(broker_line(spec)),
        _ => None,
    };
    inputs.broker = None;
    let survey = agent::survey(inputs, config.sources.timeout);
    let broker = named_broker.or_else(|| {
        survey.broker.as_ref().map(|(location, serial)| {
            broker_line(&MailboxSpec::Device {
                path: location.into(),
                serial: Some(serial.clone()),
            })
        })
    });
    let reports = survey.reports;
    if reports.is_empty() && broker.is_none() {
        return Err(CliError::NoDevices);
    }
    if let Some(line) = &broker {
        println!("{line}");
    }
    let mut bad = 0;
    for report in &reports {
        let listing = list(report);
        for line in &listing.lines {
            println!("{line}");
        }
        for problem in &listing.problems {
            eprintln!("{PROGRAM}: {problem}");
        }
        if !listing.problems.is_empty() {
            bad += 1;
        }
    }
    match bad {
        0 => Ok(()),
        bad => Err(CliError::ReadFailed {
            bad,
            total: reports.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::Parser;
    use zeroize::Zeroizing;

    use super::*;
    use crate::agent::DEFAULT_TIMEOUT;
    use crate::cli::sources::SourceSelection;
    use crate::cli::{Cli, Command};
    use crate::source::SourceSpec;
    use crate::testing::dealt_fragments;

    fn parse(extra: &[&str]) -> Result<Config, CliError> {
        let argv = ["keyshard-guest", "read"].iter().chain(extra);
        let Command::Read(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not the read subcommand");
        };
        Config::try_from(args)
    }

    #[test]
    fn arguments_become_sources_and_a_timeout() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.sources.selection, SourceSelection::Discover);
        assert_eq!(config.sources.timeout, DEFAULT_TIMEOUT);
        let config = parse(&["--vhost-user", "/run/a.sock", "--timeout", "3"]).unwrap();
        assert_eq!(
            config.sources.selection,
            SourceSelection::Named(vec![SourceSpec::VhostUser(PathBuf::from("/run/a.sock"))])
        );
        assert_eq!(config.sources.timeout, Duration::from_secs(3));
        assert!(matches!(
            parse(&["--timeout", "0"]),
            Err(CliError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_listing_shows_metadata_and_never_share_bytes() {
        let dealt = dealt_fragments(2);
        let report = SourceReport {
            location: "/dev/vdb".into(),
            serial: Some("ksf-vhd-1".into()),
            fragments: Ok(vec![
                Zeroizing::new(dealt.fragments[0].clone()),
                Zeroizing::new(b"KSHFjunk".to_vec()),
            ]),
        };
        let listing = list(&report);
        assert_eq!(listing.lines.len(), 3);
        assert_eq!(listing.lines[0], "/dev/vdb: serial ksf-vhd-1, 2 fragments");
        assert!(
            listing.lines[1].starts_with(
                "  #1: key root epoch 1 share 1 of 2 (k = 2), vhd holder vhd-1, 32-byte share, kcv "
            ),
            "{}",
            listing.lines[1]
        );
        assert_eq!(listing.lines[2], "  #2: unparseable");
        assert_eq!(listing.problems.len(), 1);
        assert!(listing.problems[0].starts_with("ksf-vhd-1 (/dev/vdb) #2: unparseable: "));
        // The share is 32 bytes of the fragment; no line carries them in any usual form.
        let fragment = Fragment::parse(&dealt.fragments[0]).unwrap();
        let share = fragment
            .verify(&dealt.manifest.dealer)
            .unwrap()
            .share()
            .value()
            .to_vec();
        let hex: String = share.iter().map(|b| format!("{b:02x}")).collect();
        assert!(listing.lines.iter().all(|line| !line.contains(&hex)));
    }

    #[test]
    fn the_broker_is_listed_by_location_and_serial() {
        assert_eq!(
            broker_line(&MailboxSpec::Device {
                path: "/dev/vdd".into(),
                serial: Some("ksb-vm-7".into())
            }),
            "/dev/vdd: serial ksb-vm-7, broker mailbox"
        );
        assert_eq!(
            broker_line(&MailboxSpec::VhostUser("/run/ksb.sock".into())),
            "socket /run/ksb.sock: broker mailbox"
        );
    }

    #[test]
    fn an_unreadable_source_is_listed_and_reported() {
        let report = SourceReport::unavailable("socket /run/x.sock".into(), None, "gone".into());
        assert_eq!(
            list(&report),
            Listing {
                lines: vec!["socket /run/x.sock: serial unknown, unreadable".into()],
                problems: vec!["socket /run/x.sock: gone".into()],
            }
        );
    }
}
