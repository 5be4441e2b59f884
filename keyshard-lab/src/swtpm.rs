//! swtpm (Debian package swtpm) as the lab and the tests run it: a TPM 2.0 simulator on
//! 127.0.0.1 with its state in a directory, manufactured first by `swtpm_setup` (Debian package
//! swtpm-tools) with an RSA 2048 and an ECC P-384 endorsement key, each with an EK certificate in
//! the TPM's NV (indices 0x01c00002 and 0x01c00016), issued by a local CA (`swtpm_localca`)
//! whose root and issuing certificates live in a directory the caller gives. TPMs made with the
//! same directory share that CA, as the TPMs of one vendor do. Nothing of /etc or
//! /var/lib/swtpm-localca is used.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{LabError, Result, io_context, one_line};

/// The TCTI string for a swtpm serving TPM commands on `port` (its control channel is
/// `port + 1`): for `--tcti` and `TPM2TOOLS_TCTI`.
pub fn tcti(port: u16) -> String {
    format!("swtpm:host=127.0.0.1,port={port}")
}

/// The local CA's certificates in `ca` (PEM), root first: the CA bundle that EK certificates of
/// TPMs made by [`manufacture`] with that directory chain to.
pub fn ek_ca_certificates(ca: &Path) -> [PathBuf; 2] {
    [
        ca.join("swtpm-localca-rootca-cert.pem"),
        ca.join("issuercert.pem"),
    ]
}

/// `swtpm_setup --tpm2 --create-ek-cert` on `state` (created; it must not hold a TPM yet), with
/// the local CA's configuration written into `ca` (created on first use, then reused; concurrent
/// runs are safe: swtpm_localca locks its directory). The PCR banks stay those of a TPM started
/// without `swtpm_setup` (sha1, sha256, sha384).
pub fn manufacture(state: &Path, ca: &Path) -> Result<()> {
    for dir in [state, ca] {
        fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
    }
    let write = |name: &str, text: String| {
        let path = ca.join(name);
        fs::write(&path, text)
            .map_err(io_context(format!("writing {}", path.display())))
            .map(|()| path)
    };
    let ca_text = ca.display();
    let localca = write(
        "swtpm-localca.conf",
        format!(
            "statedir = {ca_text}\nsigningkey = {ca_text}/signkey.pem\n\
             issuercert = {ca_text}/issuercert.pem\ncertserial = {ca_text}/certserial\n"
        ),
    )?;
    let options = write(
        "swtpm-localca.options",
        "--platform-manufacturer keyshard\n--platform-version 2.1\n--platform-model swtpm\n"
            .to_owned(),
    )?;
    let setup = write(
        "swtpm_setup.conf",
        format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\n\
             create_certs_tool_options = {}\nactive_pcr_banks = sha1,sha256,sha384\n",
            localca.display(),
            options.display()
        ),
    )?;
    let output = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--tpm-state")
        .arg(state)
        .arg("--create-ek-cert")
        .arg("--config")
        .arg(&setup)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LabError::MissingTool {
                tool: "swtpm_setup",
                package: "swtpm-tools",
            });
        }
        Err(e) => return Err(io_context("running swtpm_setup")(e)),
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    Err(LabError::ToolFailed {
        tool: format!("swtpm_setup on {}", state.display()),
        status: output.status.to_string(),
        message: one_line(if stderr.trim().is_empty() {
            &stdout
        } else {
            &stderr
        }),
    })
}

/// `swtpm socket` serving TPM 2.0 commands on 127.0.0.1:`port` and its control channel on
/// `port + 1`, state in `state`, already initialised (`not-need-init,startup-clear`). The
/// caller sets stdio and may add options (`--log`).
pub fn socket_command(state: &Path, port: u16) -> Command {
    let mut command = Command::new("swtpm");
    command
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!(
            "type=tcp,port={},bindaddr=127.0.0.1",
            port.saturating_add(1)
        ))
        .arg("--flags")
        .arg("not-need-init,startup-clear");
    crate::inherit::close_inherited_fds(&mut command);
    command
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`: the listener's inode in
/// /proc/net/tcp is among the process's open sockets. A port that answers may belong to another
/// process that took it first.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let listeners: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            match (fields.get(1), fields.get(3), fields.get(9)) {
                (Some(addr), Some(&"0A"), Some(inode)) if *addr == local => {
                    Some(format!("socket:[{inode}]"))
                }
                _ => None,
            }
        })
        .collect();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .is_ok_and(|target| listeners.iter().any(|l| target.as_os_str() == l.as_str()))
    })
}

/// P such that P and P+1 look free, in 20000..32000: below Linux's ephemeral range
/// (32768..60999), where the TIME_WAIT sockets the swtpm TCTI leaves behind (one TCP connection
/// per TPM command) would make collisions likely. Another process can still take them before
/// swtpm binds: callers retry with the next `attempt` then.
pub fn free_port_pair(attempt: u32) -> Result<u16> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(attempt.wrapping_mul(7919));
    for i in 0..500u32 {
        let offset = seed.wrapping_add(i.wrapping_mul(37)) % 6000;
        let Ok(port) = u16::try_from(20_000 + offset * 2) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(LabError::NoFreePort {
        what: "port pair in 20000..32000 for swtpm",
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn port_pairs_stay_below_the_ephemeral_range_and_start_even() {
        for attempt in 0..20 {
            let port = free_port_pair(attempt).unwrap();
            assert!((20_000..32_000).contains(&port), "{port}");
            assert_eq!(port % 2, 0);
        }
    }

    #[test]
    fn a_listener_is_found_in_its_own_process_only() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
        // PID 1 does not hold our port.
        let again = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!listens_on(1, again.local_addr().unwrap().port()));
    }

    #[test]
    fn manufacturing_writes_the_ca_in_the_given_directory_and_fails_on_a_used_state() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        manufacture(&dir.path().join("tpm"), &ca).unwrap();
        for cert in ek_ca_certificates(&ca) {
            let pem = fs::read_to_string(&cert).unwrap();
            assert!(
                pem.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                cert.display()
            );
        }
        assert!(
            fs::read_to_string(ca.join("swtpm-localca.conf"))
                .unwrap()
                .contains(&format!("statedir = {}", ca.display()))
        );
        // swtpm_setup refuses a state that already holds a TPM: the error names the state.
        let err = manufacture(&dir.path().join("tpm"), &ca)
            .unwrap_err()
            .to_string();
        assert!(err.contains("swtpm_setup on"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
