//! `keyshard-guest` as a user runs it, on fragment volume image files: what reaches stdout and
//! stderr, and the exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::fs;
use std::process::Command;

use common::{Fixture, SECRET, keyshard_guest};

fn unlock_with(fixture: &Fixture, images: &[usize], extra: &[&str]) -> std::process::Output {
    let manifest = fixture.manifest_path();
    let mut args = vec!["unlock", "--manifest", manifest.to_str().unwrap()];
    for image in images {
        args.push("--device");
        args.push(fixture.images[image - 1].to_str().unwrap());
    }
    args.extend(extra);
    keyshard_guest(&args)
}

#[test]
fn two_of_three_images_give_the_raw_secret_on_stdout() {
    let fixture = Fixture::new();
    let run = unlock_with(&fixture, &[3, 1], &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert_eq!(run.stdout, SECRET);
    assert!(
        stderr.contains(
            "keyshard-guest: warn: skipped vhd-2: unavailable: no device with serial ksf-vhd-2"
        ),
        "{stderr}"
    );
}

#[test]
fn a_forged_fragment_is_named_and_the_quorum_is_not_met() {
    let fixture = Fixture::new();
    // Flip a byte of the signature at the end of vhd-2's fragment.
    let mut image = fs::read(&fixture.images[1]).unwrap();
    let fragment_len = usize::from(u16::from_le_bytes([image[8], image[9]]));
    image[10 + fragment_len - 1] ^= 0x01;
    fs::write(&fixture.images[1], image).unwrap();

    let run = unlock_with(&fixture, &[1, 2], &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(run.stdout.is_empty());
    let forged = fixture.images[1].display();
    let expected = [
        format!(
            "keyshard-guest: rejected {forged}: bad signature: tampered, or not signed by the \
             trusted dealer key"
        ),
        "keyshard-guest: missing vhd-3: no device with serial ksf-vhd-3".to_owned(),
        format!(
            "keyshard-guest: unused {}: epoch 1 has only 1 valid of the 2 shares it needs",
            fixture.images[0].display()
        ),
        "keyshard-guest: quorum not met: 1 valid fragment(s) of one epoch, 2 needed".to_owned(),
    ];
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn the_secret_is_never_written_to_a_terminal() {
    let fixture = Fixture::new();
    let manifest = fixture.manifest_path();
    // script(1) runs the command with its stdout on a pseudo-terminal.
    let command = format!(
        "{} unlock --manifest {} --device {} --device {}",
        env!("CARGO_BIN_EXE_keyshard-guest"),
        manifest.display(),
        fixture.images[0].display(),
        fixture.images[1].display()
    );
    let run = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1) from util-linux");
    let seen = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{seen}");
    assert!(
        seen.contains("keyshard-guest: refusing to write the secret to a terminal"),
        "{seen}"
    );
    assert!(!run.stdout.windows(SECRET.len()).any(|w| w == SECRET));
}

#[test]
fn other_errors_exit_1_with_one_line() {
    let fixture = Fixture::new();
    let bad_manifest = fixture.dir.path().join("bad.toml");
    fs::write(&bad_manifest, "version = 2\n").unwrap();
    for args in [
        vec!["unlock", "--manifest", bad_manifest.to_str().unwrap()],
        vec!["unlock", "--manifest", "/nonexistent/manifest.toml"],
        vec![
            "unlock",
            "--manifest",
            fixture.manifest_path().to_str().unwrap(),
            "--timeout",
            "0",
        ],
        vec!["read", "--device", "/nonexistent/image"],
    ] {
        let run = keyshard_guest(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(run.stdout.is_empty() || args[0] == "read", "{args:?}");
        assert!(stderr.starts_with("keyshard-guest: "), "{stderr}");
    }
    // A usage error is 1 too, not clap's 2, which would read as "quorum not met".
    let run = keyshard_guest(&["unlock", "--no-such-option"]);
    assert_eq!(run.status.code(), Some(1));
}

#[test]
fn item11_usage_errors_are_one_line() {
    for (args, expected) in [
        (
            &["unlock", "--manifest"][..],
            "keyshard-guest: a value is required for '--manifest <FILE>' but none was supplied \
             (try --help)\n",
        ),
        (
            &["frobnicate"][..],
            "keyshard-guest: unrecognized subcommand 'frobnicate' (try --help)\n",
        ),
    ] {
        let run = keyshard_guest(args);
        assert_eq!(run.status.code(), Some(1), "{args:?}");
        assert_eq!(String::from_utf8(run.stderr).unwrap(), expected, "{args:?}");
    }
}

/// Review of issue 7: the worker's arguments are `--option=VALUE`, so an image whose name starts
/// with `-` is read as the path it is, never taken for an option of the worker (before, `--path
/// -vhd-1.img` made the worker's own argument parser fail and the device read as "the worker
/// ended without reporting").
#[test]
fn review_a_device_path_that_starts_with_a_dash_is_not_an_option() {
    let fixture = Fixture::new();
    for (i, name) in [(0, "-vhd-1.img"), (2, "--serial-only")] {
        fs::copy(&fixture.images[i], fixture.dir.path().join(name)).unwrap();
    }
    let run = Command::new(env!("CARGO_BIN_EXE_keyshard-guest"))
        .current_dir(fixture.dir.path())
        .args(["unlock", "--manifest", "manifest.toml"])
        .args(["--device=-vhd-1.img", "--device=--serial-only"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert_eq!(run.stdout, SECRET);
    assert!(!stderr.contains("worker ended"), "{stderr}");
}
