//! `keyshard snp verify`: the CLI on the real Milan evidence (the SNP test data of
//! `keyshard-attest`), with and without a policy, and on tampered evidence.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyshard_attest::snp::Report;
use keyshard_attest::snp::report::OFF_CHIP_ID;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../keyshard-attest/tests/data/snp")
}

fn real_report_bytes() -> Vec<u8> {
    let text = std::fs::read_to_string(data_dir().join("report_milan.hex")).unwrap();
    let report = Report::from_hex(&text).unwrap();
    report.as_bytes().to_vec()
}

fn real_vcek() -> Vec<u8> {
    std::fs::read(data_dir().join("vcek_milan.der")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// keyshard snp verify

struct CliDir {
    dir: tempfile::TempDir,
}

impl CliDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["report_milan.hex", "vcek_milan.der"] {
            std::fs::copy(data_dir().join(name), dir.path().join(name)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .args(["snp", "verify"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn write_real_policy(&self, measurement: &str) {
        let text = format!(
            "measurements = [\"{measurement}\"]\n\n[min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n"
        );
        self.write("policy.toml", text.as_bytes());
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const REAL_ARGS: [&str; 4] = ["--report", "report_milan.hex", "--vcek", "vcek_milan.der"];

#[test]
fn cli_accepts_the_real_evidence_as_hex_or_binary() {
    let cli = CliDir::new();
    let out = cli.run(&REAL_ARGS);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verified"), "{text}");
    assert!(text.contains("Milan-B0"), "{text}");
    assert!(text.contains("no --policy"), "{text}");

    cli.write("report.bin", &real_report_bytes());
    let out = cli.run(&["--report", "report.bin", "--vcek", "vcek_milan.der"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Item 10 of issue 7: without --policy the output names each check it did not make.
#[test]
fn item10_cli_without_policy_names_every_check_it_did_not_make() {
    let cli = CliDir::new();
    let out = cli.run(&REAL_ARGS);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("no --policy"))
        .unwrap_or_else(|| panic!("no 'no --policy' line in {text}"));
    for check in [
        "report version",
        "debug",
        "migration-agent",
        "SMT",
        "TSME",
        "single socket",
        "ABI minimum",
        "VMPL",
        "measurement",
        "REPORTED_TCB",
        "COMMITTED_TCB",
        "LAUNCH_TCB",
        "CHIP_ID",
    ] {
        assert!(line.contains(check), "{check} is not named in: {line}");
    }
    assert!(text.contains("REPORT_DATA: not checked"), "{text}");
    // What the report says about them, so the operator can write the policy.
    assert!(
        text.contains(
            "guest policy 0x30000 (debug off, SMT allowed, single socket off, ABI minimum 0.0), \
             platform info 0x1 (SMT on, TSME off)"
        ),
        "{text}"
    );
}

/// Item 10: the new options in a policy file, through the CLI, on the real report.
#[test]
fn item10_cli_policy_file_options_refuse_the_real_report() {
    let cli = CliDir::new();
    let report = Report::from_bytes(&real_report_bytes()).unwrap();
    let measurement = hex::encode(report.measurement());
    for (option, reason) in [
        ("allow_smt = false", "SMT is enabled on the host"),
        ("require_tsme = true", "TSME is not enabled"),
        ("require_single_socket = true", "single socket"),
        ("min_abi = \"1.0\"", "ABI minimum 0.0 is below"),
    ] {
        let text = format!(
            "measurements = [\"{measurement}\"]\n{option}\n[min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n"
        );
        cli.write("policy.toml", text.as_bytes());
        let mut args = REAL_ARGS.to_vec();
        args.extend(["--policy", "policy.toml"]);
        let out = cli.run(&args);
        assert_eq!(out.status.code(), Some(1), "{option}: {}", stdout(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(reason), "{option}: {err}");
    }
}

#[test]
fn cli_applies_the_policy_and_report_data() {
    let cli = CliDir::new();
    let report = Report::from_bytes(&real_report_bytes()).unwrap();
    cli.write_real_policy(&hex::encode(report.measurement()));
    let report_data = hex::encode(report.report_data());
    let mut args = REAL_ARGS.to_vec();
    args.extend(["--policy", "policy.toml", "--report-data", &report_data]);
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("policy policy.toml"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("REPORT_DATA: matches"));

    // Another expected REPORT_DATA.
    let mut args = REAL_ARGS.to_vec();
    let zeros = "00".repeat(64);
    args.extend(["--policy", "policy.toml", "--report-data", &zeros]);
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("REPORT_DATA"), "{}", stderr(&out));

    // A measurement the policy does not allow.
    cli.write_real_policy(&"ab".repeat(48));
    let mut args = REAL_ARGS.to_vec();
    args.extend(["--policy", "policy.toml"]);
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("measurement"), "{err}");
}

#[test]
fn cli_refuses_tampered_evidence_with_the_reason() {
    let cli = CliDir::new();
    // A TCB reserved byte the sev crate's own check would miss.
    let mut bytes = real_report_bytes();
    bytes[0x183] ^= 0x01;
    cli.write("tampered.hex", hex::encode(&bytes).as_bytes());
    let out = cli.run(&["--report", "tampered.hex", "--vcek", "vcek_milan.der"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("report signature"), "{err}");
    assert!(stdout(&out).is_empty());

    // A VCEK with a flipped bit in its signed part.
    let mut der = real_vcek();
    der[300] ^= 0x01;
    cli.write("tampered.der", &der);
    let out = cli.run(&["--report", "report_milan.hex", "--vcek", "tampered.der"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));

    // Not a report at all, and a bad --report-data.
    cli.write("short.hex", hex::encode(&bytes[..100]).as_bytes());
    let out = cli.run(&["--report", "short.hex", "--vcek", "vcek_milan.der"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("1184"), "{}", stderr(&out));
    let mut args = REAL_ARGS.to_vec();
    args.extend(["--report-data", "abcd"]);
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--report-data"), "{}", stderr(&out));
}

#[test]
fn cli_masks_nothing_when_chip_id_is_altered() {
    // CHIP_ID is signed: changing it is a signature failure, not a policy one.
    let cli = CliDir::new();
    let mut bytes = real_report_bytes();
    bytes[OFF_CHIP_ID] ^= 0x80;
    cli.write("chip.bin", &bytes);
    let out = cli.run(&["--report", "chip.bin", "--vcek", "vcek_milan.der"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("report signature"),
        "{}",
        stderr(&out)
    );
}
