//! The `keyshard` binary as a user runs it: files, exit codes, and what reaches stdout/stderr.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keyshard_core::Fragment;
use keyshard_core::keys;

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A dealer key, a random 32-byte secret, and a 3-of-5 split of it.
    fn split_3_of_5() -> Self {
        let ws = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        ws.ok(&["keygen", "--out", "dealer.pem"]);
        fs::write(ws.path("secret"), random_secret()).unwrap();
        ws.ok(&[
            "split",
            "--secret-file",
            "secret",
            "--threshold",
            "3",
            "--shares",
            "5",
            "--signing-key",
            "dealer.pem",
            "--out-dir",
            "frags",
            "--key-id",
            "root",
        ]);
        ws
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, &[])
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
        out
    }

    fn secret(&self) -> Vec<u8> {
        fs::read(self.path("secret")).unwrap()
    }
}

fn random_secret() -> Vec<u8> {
    keys::generate().unwrap().to_bytes().to_vec()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn combine(ws: &Workspace, fragments: &[&str]) -> Output {
    let mut args = vec!["combine", "--verify-key", "dealer.pem.pub"];
    args.extend_from_slice(fragments);
    ws.run(&args)
}

#[test]
fn keygen_writes_a_private_0600_key_and_refuses_to_overwrite_it() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let out = ws.ok(&["keygen", "--out", "dealer.pem"]);
    assert!(stdout(&out).contains("dealer.pem.pub"));
    assert_eq!(mode(&ws.path("dealer.pem")), 0o600);
    let before = fs::read(ws.path("dealer.pem")).unwrap();
    assert!(String::from_utf8_lossy(&before).starts_with("-----BEGIN PRIVATE KEY-----"));

    let again = ws.run(&["keygen", "--out", "dealer.pem"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(fs::read(ws.path("dealer.pem")).unwrap(), before);

    ws.ok(&["keygen", "--out", "dealer.pem", "--force"]);
    assert_ne!(fs::read(ws.path("dealer.pem")).unwrap(), before);
}

#[test]
fn split_writes_n_private_fragments_and_any_three_rebuild_the_secret() {
    let ws = Workspace::split_3_of_5();
    for i in 1..=5 {
        assert_eq!(mode(&ws.path(&format!("frags/fragment-{i}.ksf"))), 0o600);
    }
    assert!(!ws.path("frags/fragment-6.ksf").exists());
    let out = combine(
        &ws,
        &[
            "frags/fragment-5.ksf",
            "frags/fragment-2.ksf",
            "frags/fragment-3.ksf",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, ws.secret());
    assert!(stderr(&out).contains("rebuilt key root (epoch 1, deal "));
    assert!(stderr(&out).contains(") from 3 of 3"));
}

#[test]
fn combine_out_writes_a_0600_file_and_nothing_on_stdout() {
    let ws = Workspace::split_3_of_5();
    let out = ws.ok(&[
        "combine",
        "--verify-key",
        "dealer.pem.pub",
        "--out",
        "key.bin",
        "frags/fragment-1.ksf",
        "frags/fragment-2.ksf",
        "frags/fragment-4.ksf",
    ]);
    assert!(out.stdout.is_empty());
    assert_eq!(fs::read(ws.path("key.bin")).unwrap(), ws.secret());
    assert_eq!(mode(&ws.path("key.bin")), 0o600);
}

#[test]
fn two_fragments_of_three_needed_exit_2_with_nothing_on_stdout() {
    let ws = Workspace::split_3_of_5();
    let out = combine(&ws, &["frags/fragment-1.ksf", "frags/fragment-4.ksf"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("quorum not met: 2 valid fragment(s) of one epoch, 3 needed"),
        "{err}"
    );
    assert!(err.contains("unused frags/fragment-1.ksf"), "{err}");
    assert!(err.contains("unused frags/fragment-4.ksf"), "{err}");
}

#[test]
fn a_tampered_fragment_is_named_and_skipped() {
    let ws = Workspace::split_3_of_5();
    let mut bytes = fs::read(ws.path("frags/fragment-2.ksf")).unwrap();
    bytes[40] ^= 0x01;
    fs::write(ws.path("frags/fragment-2.ksf"), bytes).unwrap();
    let out = combine(
        &ws,
        &[
            "frags/fragment-1.ksf",
            "frags/fragment-2.ksf",
            "frags/fragment-3.ksf",
            "frags/fragment-4.ksf",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, ws.secret());
    assert!(
        stderr(&out).contains("skipped frags/fragment-2.ksf: bad signature"),
        "{}",
        stderr(&out)
    );

    // With only three fragments, the tampered one leaves the quorum short: exit 2, named.
    let out = combine(
        &ws,
        &[
            "frags/fragment-1.ksf",
            "frags/fragment-2.ksf",
            "frags/fragment-3.ksf",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("rejected frags/fragment-2.ksf: bad signature"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn another_dealers_key_rebuilds_nothing() {
    let ws = Workspace::split_3_of_5();
    ws.ok(&["keygen", "--out", "other.pem"]);
    let out = ws.run(&[
        "combine",
        "--verify-key",
        "other.pem.pub",
        "frags/fragment-1.ksf",
        "frags/fragment-2.ksf",
        "frags/fragment-3.ksf",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("0 valid"), "{}", stderr(&out));
}

#[test]
fn split_reads_the_secret_from_stdin_exactly() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    ws.ok(&["keygen", "--out", "dealer.pem"]);
    let secret = b"secret with a trailing newline\n";
    let out = ws.run_with_stdin(
        &[
            "split",
            "--secret-file",
            "-",
            "--threshold",
            "2",
            "--shares",
            "2",
            "--signing-key",
            "dealer.pem",
            "--out-dir",
            "f",
        ],
        secret,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = combine(&ws, &["f/fragment-1.ksf", "f/fragment-2.ksf"]);
    assert_eq!(out.stdout, secret);
}

#[test]
fn split_refuses_to_replace_fragments_and_changes_nothing() {
    let ws = Workspace::split_3_of_5();
    let before = fs::read(ws.path("frags/fragment-3.ksf")).unwrap();
    let out = ws.run(&[
        "split",
        "--secret-file",
        "secret",
        "--threshold",
        "2",
        "--shares",
        "5",
        "--signing-key",
        "dealer.pem",
        "--out-dir",
        "frags",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already exists (pass --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(ws.path("frags/fragment-3.ksf")).unwrap(), before);
}

#[test]
fn inspect_shows_metadata_and_never_share_bytes() {
    let ws = Workspace::split_3_of_5();
    let bytes = fs::read(ws.path("frags/fragment-2.ksf")).unwrap();
    let dealer =
        keys::verifying_key_from_pem(&fs::read_to_string(ws.path("dealer.pem.pub")).unwrap())
            .unwrap();
    let verified = Fragment::parse(&bytes).unwrap().verify(&dealer).unwrap();
    let share_hex = hex::encode(verified.share().value());

    let out = ws.ok(&[
        "inspect",
        "--json",
        "--verify-key",
        "dealer.pem.pub",
        "frags/fragment-2.ksf",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = &json[0];
    assert_eq!(info["key_id"], "root");
    assert_eq!(
        (
            info["index"].as_u64(),
            info["k"].as_u64(),
            info["n"].as_u64()
        ),
        (Some(2), Some(3), Some(5))
    );
    assert_eq!(
        (info["class"].as_str(), info["holder_id"].as_str()),
        (Some("vhd"), Some("vhd-2"))
    );
    assert_eq!(info["share_len"], 32);
    assert_eq!(info["signature_valid"], true);
    let deal = verified.header().deal.to_string();
    assert_eq!(info["deal"].as_str(), Some(deal.as_str()));
    assert_eq!(deal.len(), 32);
    assert!(!stdout(&out).contains(&share_hex[..16]));

    let text = ws.ok(&["inspect", "frags/fragment-2.ksf"]);
    assert!(
        stdout(&text).contains(&format!(
            "deal {deal} share 2 of 5 (k = 3), vhd holder vhd-2"
        )),
        "{}",
        stdout(&text)
    );
    assert!(!stdout(&text).contains(&share_hex[..16]));
}

#[test]
fn inspect_reports_garbage_and_exits_1() {
    let ws = Workspace::split_3_of_5();
    fs::write(ws.path("junk.ksf"), b"KSHF\x09").unwrap();
    let out = ws.run(&["inspect", "frags/fragment-1.ksf", "junk.ksf"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("frags/fragment-1.ksf: key root"));
    assert!(
        stderr(&out).contains("junk.ksf: unsupported fragment version 9"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn policy_check_says_which_adversaries_each_example_resists() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let check =
        |name: &str| stdout(&ws.ok(&["policy", "check", examples.join(name).to_str().unwrap()]));

    let out = check("vhd-tpm.toml");
    for line in [
        "tpm shares sealed to sha256 PCRs 0, 7",
        "stolen disk image: resists: obtains no share (0 of the 3 shares needed)",
        "stolen state directory: resists: obtains vhd 2 (2 of the 3 shares needed)",
        "changed firmware or boot chain: resists: obtains vhd 2 (2 of the 3 shares needed)",
        "  only if sha256 PCRs 0, 7 measure the change: a change they do not measure is not detected",
        "root on this host: does not resist: obtains vhd 2, tpm 1 (3 of the 3 shares needed)",
        "  accepted because allow_host_reachable_quorum = true",
        "recovery share: kept offline, so none of these obtains it; a stolen state directory \
         together with it obtains 3 of the 3 shares needed",
        // Item 2 (review): "kept offline" is the operator's doing; a recovery file left on the
        // host is read after a boot change as well, and that adversary then reaches k.
        "  only while it is kept off this host: a recovery file or code left on it is read by a \
         changed firmware or boot chain too, which then obtains 3 of the 3 shares needed",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }

    let out = check("vhd-only.toml");
    for line in [
        "stolen disk image: resists",
        "stolen state directory: does not resist: obtains vhd 3 (3 of the 3 shares needed)",
        "changed firmware or boot chain: does not resist",
        "root on this host: does not resist",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
}

#[test]
fn policy_check_refuses_a_host_reachable_quorum_and_the_old_override_name() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let refused = |text: &str, wanted: &str| {
        fs::write(ws.path("p.toml"), text).unwrap();
        let out = ws.run(&["policy", "check", "p.toml"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(wanted), "{}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    };
    refused(
        "threshold = 3\n[holders]\nvhd = 2\ntpm = 1\n[tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n",
        "the host-reachable shares (vhd 2, tpm 1) reach threshold 3",
    );
    refused(
        "allow_host_visible_quorum = true\nthreshold = 3\n[holders]\nvhd = 3\n",
        "allow_host_visible_quorum was renamed allow_host_reachable_quorum",
    );
}

/// Issue 7 item 5: two splits of one secret with the same key id and epoch; `combine A1 B2 A3`
/// exited 2, although A1 and A3 rebuild the secret.
#[test]
fn item5_combine_a1_b2_a3_rebuilds_the_secret_in_any_order() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    ws.ok(&["keygen", "--out", "dealer.pem"]);
    fs::write(ws.path("secret"), random_secret()).unwrap();
    for dir in ["a", "b"] {
        ws.ok(&[
            "split",
            "--secret-file",
            "secret",
            "--threshold",
            "2",
            "--shares",
            "3",
            "--signing-key",
            "dealer.pem",
            "--out-dir",
            dir,
            "--key-id",
            "root",
            "--epoch",
            "4",
        ]);
    }
    let orders = [
        ["a/fragment-1.ksf", "b/fragment-2.ksf", "a/fragment-3.ksf"],
        ["b/fragment-2.ksf", "a/fragment-3.ksf", "a/fragment-1.ksf"],
    ];
    for order in orders {
        let out = combine(&ws, &order);
        assert!(out.status.success(), "{order:?}: {}", stderr(&out));
        assert_eq!(out.stdout, ws.secret(), "{order:?}");
        assert!(
            stderr(&out).contains("skipped b/fragment-2.ksf: another split of epoch 4"),
            "{}",
            stderr(&out)
        );
    }
}

/// Issue 7 item 12: a `--verify-key` that is the identity point (under which R = identity,
/// s = 0 verifies any message with plain verification) is refused on loading.
#[test]
fn item12_a_weak_verify_key_is_refused() {
    use ed25519_dalek::pkcs8::EncodePublicKey;
    let ws = Workspace::split_3_of_5();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
    let pem = weak
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .unwrap();
    fs::write(ws.path("weak.pub"), pem).unwrap();
    for args in [
        &[
            "combine",
            "--verify-key",
            "weak.pub",
            "frags/fragment-1.ksf",
        ][..],
        &[
            "inspect",
            "--verify-key",
            "weak.pub",
            "frags/fragment-1.ksf",
        ],
    ] {
        let out = ws.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("weak.pub: the dealer public key is a weak (small-order)"),
            "{}",
            stderr(&out)
        );
        assert_eq!(stderr(&out).lines().count(), 1);
    }
}

/// Issue 7 item 11: `split --force` with a smaller n left fragment-4 and fragment-5 of the
/// old split next to the new one. Stale fragments go; files that are not fragments stay.
#[test]
fn item11_split_force_with_a_smaller_n_removes_only_stale_fragments() {
    let ws = Workspace::split_3_of_5();
    fs::copy(
        ws.path("frags/fragment-1.ksf"),
        ws.path("frags/fragment-9.ksf"),
    )
    .unwrap();
    fs::write(ws.path("frags/fragment-7.ksf"), b"my notes, not a fragment").unwrap();
    fs::write(ws.path("frags/notes.txt"), b"keep me").unwrap();
    let out = ws.ok(&[
        "split",
        "--secret-file",
        "secret",
        "--threshold",
        "2",
        "--shares",
        "3",
        "--signing-key",
        "dealer.pem",
        "--out-dir",
        "frags",
        "--key-id",
        "root",
        "--force",
    ]);
    for i in 1..=3 {
        assert!(ws.path(&format!("frags/fragment-{i}.ksf")).exists());
    }
    for i in [4, 5, 9] {
        assert!(
            !ws.path(&format!("frags/fragment-{i}.ksf")).exists(),
            "fragment-{i}.ksf is still there"
        );
    }
    assert_eq!(
        fs::read(ws.path("frags/fragment-7.ksf")).unwrap(),
        b"my notes, not a fragment"
    );
    assert_eq!(fs::read(ws.path("frags/notes.txt")).unwrap(), b"keep me");
    assert!(stdout(&out).contains("removed 3 stale fragment file(s)"));
    assert!(
        stderr(&out).contains("fragment-7.ksf: not a keyshard fragment"),
        "{}",
        stderr(&out)
    );
    let out = combine(&ws, &["frags/fragment-1.ksf", "frags/fragment-3.ksf"]);
    assert_eq!(out.stdout, ws.secret());
}

/// Issue 7 item 11: clap's usage errors were several lines (message, usage, hint).
#[test]
fn item11_usage_errors_are_one_line() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "split",
                "--threshold",
                "300",
                "--shares",
                "3",
                "--secret-file",
                "s",
                "--signing-key",
                "k",
                "--out-dir",
                "d",
            ],
            "keyshard: invalid value '300' for '--threshold <K>': 300 is not in 0..=255 (try --help)",
        ),
        (
            &["split", "--threshold", "2"],
            "keyshard: the following required arguments were not provided: --secret-file <FILE|->, \
             --shares <N>, --signing-key <FILE>, --out-dir <DIR> (try --help)",
        ),
        (
            &["frobnicate"],
            "keyshard: unrecognized subcommand 'frobnicate' (try --help)",
        ),
    ];
    for (args, line) in cases {
        let out = ws.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out), format!("{line}\n"), "{args:?}");
    }
    let help = ws.run(&["split", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).lines().count() > 5);
}

/// Issue 7 item 6: `init` said "2 of 2 shares rebuild it" and wrote one fragment. Issue 9 item 8:
/// `policy check` accepts `host` shares and counts them off the host when the guest presents
/// SEV-SNP evidence (it refused them as having no holder); `init` without a CMS to place them
/// refuses them before writing anything (`keyshard/tests/host_class.rs` places them).
#[test]
fn item8_policy_check_counts_host_shares_off_host_and_init_refuses_to_drop_them() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let policy = "threshold = 3\n[holders]\nvhd = 1\ntpm = 1\nhost = 2\n\
                  [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";
    fs::write(
        ws.path("snp.toml"),
        format!("{policy}[host]\nevidence = \"sev-snp\"\n"),
    )
    .unwrap();
    let out = ws.run(&["policy", "check", "snp.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("ok: 4 shares (vhd 1, tpm 1, host 2), threshold 3"),
        "{text}"
    );
    assert!(
        text.contains(
            "root on this host: resists: obtains vhd 1, tpm 1 (2 of the 3 shares needed)"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "host shares released to sev-snp evidence: host shares are held off this host"
        ),
        "{text}"
    );

    // The same shares released to the VM's own (host-run) TPM reach k with root on the host.
    fs::write(
        ws.path("vtpm.toml"),
        format!("{policy}[host]\nevidence = \"vm-tpm\"\n"),
    )
    .unwrap();
    let out = ws.run(&["policy", "check", "vtpm.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("host-reachable shares (vhd 1, tpm 1, host 2) reach threshold 3"),
        "{}",
        stderr(&out)
    );

    let out = ws.run(&["init", "--policy", "snp.toml", "--state-dir", "state"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no CMS to place them on shard hosts was given"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(!ws.path("state").exists(), "init wrote a state directory");

    // The CMS options come together, and only for a policy with host shares.
    let out = ws.run(&[
        "init",
        "--policy",
        "snp.toml",
        "--state-dir",
        "state",
        "--cms",
        "https://127.0.0.1:9",
        "--ca",
        "ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--cms: needs --client-pub too"),
        "{}",
        stderr(&out)
    );
    let out = ws.run(&[
        "init",
        "--policy",
        "snp.toml",
        "--state-dir",
        "state",
        "--ca",
        "ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--ca: only with --cms"),
        "{}",
        stderr(&out)
    );
    assert!(!ws.path("state").exists(), "init wrote a state directory");
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    assert_eq!(ws.run(&["frobnicate"]).status.code(), Some(1));
    assert_eq!(
        ws.run(&["split", "--threshold", "x"]).status.code(),
        Some(1)
    );
    assert_eq!(ws.run(&["--help"]).status.code(), Some(0));
    let out = ws.run(&[
        "split",
        "--secret-file",
        "s",
        "--threshold",
        "4",
        "--shares",
        "3",
        "--signing-key",
        "k",
        "--out-dir",
        "d",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("exceeds the number of shares"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn split_writes_a_manifest_that_pins_dealer_key_and_secret() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    ws.ok(&["keygen", "--out", "dealer.pem"]);
    fs::write(ws.path("secret"), random_secret()).unwrap();
    ws.ok(&[
        "split",
        "--secret-file",
        "secret",
        "--threshold",
        "2",
        "--shares",
        "3",
        "--signing-key",
        "dealer.pem",
        "--out-dir",
        "f",
        "--key-id",
        "root",
        "--manifest-out",
        "manifest.toml",
    ]);
    let text = fs::read_to_string(ws.path("manifest.toml")).unwrap();
    let manifest = keyshard_core::manifest::Manifest::parse(&text).unwrap();
    let dealer =
        keys::verifying_key_from_pem(&fs::read_to_string(ws.path("dealer.pem.pub")).unwrap())
            .unwrap();
    assert_eq!(manifest.dealer, dealer);
    assert_eq!(
        (
            manifest.key_id.as_str(),
            manifest.threshold,
            manifest.holders.len()
        ),
        ("root", 2, 3)
    );
    assert!(
        manifest
            .key_check_value
            .matches(&ws.secret(), &manifest.key_id)
    );
}

/// Item 8 (review): `init --recovery-file` into a directory that does not exist wrote the whole
/// state, printed "initialised", then failed to write the recovery share: a state listing a
/// recovery holder whose share exists nowhere, and a rerun refused without --force. The path is
/// now checked before anything is written.
#[test]
fn item8_init_checks_the_recovery_files_directory_before_writing_the_state() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    fs::write(
        ws.path("p.toml"),
        "threshold = 3\nallow_host_reachable_quorum = true\n[holders]\nvhd = 3\nrecovery = 1\n",
    )
    .unwrap();
    let out = ws.run(&[
        "init",
        "--policy",
        "p.toml",
        "--state-dir",
        "vm1",
        "--recovery-file",
        "missing/recovery.ksf",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(!stdout(&out).contains("initialised"), "{}", stdout(&out));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(!ws.path("vm1").join("state.toml").exists(), "state written");
    // With the directory there, the same command works and writes the share.
    fs::create_dir(ws.path("missing")).unwrap();
    ws.ok(&[
        "init",
        "--policy",
        "p.toml",
        "--state-dir",
        "vm1",
        "--recovery-file",
        "missing/recovery.ksf",
    ]);
    assert_eq!(mode(&ws.path("missing/recovery.ksf")), 0o600);
}

/// Item 11 (review), for `init` as for `split`: `init --force` by a policy with fewer holders
/// left the old key's `fragments/vhd-3.ksf` (and `sealed/tpm-*.key`/`.ksf.enc`) in the state
/// directory, so the key it was asked to replace stayed rebuildable from the directory. Only
/// keyshard's own files of holders the new state does not list are removed.
#[test]
fn item11_init_force_with_fewer_holders_removes_the_old_keys_shares() {
    let ws = Workspace {
        dir: tempfile::tempdir().unwrap(),
    };
    let policy = |vhd: u8| {
        format!("threshold = 2\nallow_host_reachable_quorum = true\n[holders]\nvhd = {vhd}\n")
    };
    fs::write(ws.path("big.toml"), policy(3)).unwrap();
    fs::write(ws.path("small.toml"), policy(2)).unwrap();
    ws.ok(&["init", "--policy", "big.toml", "--state-dir", "vm1"]);
    let old = fs::read(ws.path("vm1/fragments/vhd-3.ksf")).unwrap();
    // Not keyshard's: left alone.
    fs::write(ws.path("vm1/fragments/notes.txt"), "mine").unwrap();
    fs::write(ws.path("vm1/fragments/vhd-9.ksf"), "not a fragment").unwrap();
    let out = ws.ok(&[
        "init",
        "--policy",
        "small.toml",
        "--state-dir",
        "vm1",
        "--force",
    ]);
    assert!(
        !ws.path("vm1/fragments/vhd-3.ksf").exists(),
        "a share of the replaced key is left: {} bytes",
        old.len()
    );
    assert!(stdout(&out).contains("removed 1"), "{}", stdout(&out));
    assert!(ws.path("vm1/fragments/vhd-1.ksf").exists());
    assert!(ws.path("vm1/fragments/vhd-2.ksf").exists());
    assert!(ws.path("vm1/fragments/notes.txt").exists());
    assert!(ws.path("vm1/fragments/vhd-9.ksf").exists());
}
