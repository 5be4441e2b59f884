//! The `vhost-keyshard` daemon: loads each device's fragment volume, binds every socket, says it
//! is ready, serves until SIGTERM or SIGINT, and removes its sockets on the way out.

pub mod access;
pub mod config;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::device::media::BlockMedia;
use crate::device::serve::{BoundSocket, ServeError, Stopper};
use crate::fragment_volume::{FragmentVolume, FragmentVolumeError, SERIAL_PREFIX};
pub use config::{Args, Config, ConfigError, DeviceConfig};
use keyshard_core::files::{self, FileError, Overwrite};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("device {socket}: {source}", socket = socket.display())]
    Volume {
        socket: PathBuf,
        source: FragmentVolumeError,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("pidfile: {0}")]
    Pidfile(FileError),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot start a device thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot make the stop event: {0}")]
    StopEvent(std::io::Error),
    #[error("a device thread failed")]
    Thread,
}

/// A bound socket and what it serves.
pub struct ServedDevice {
    /// The device's serial, for logs and thread names.
    pub name: String,
    pub socket: BoundSocket,
    pub media: Arc<dyn BlockMedia>,
}

/// Runs until a stop signal; every socket is bound before "ready" is announced.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Signal handlers first, so a SIGTERM during start-up is not lost.
    let signals = Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    raise_open_files_limit();
    let devices = config
        .devices
        .iter()
        .map(|device| {
            let media = FragmentVolume::load(&device.fragments, device.holder_id.clone()).map_err(
                |source| DaemonError::Volume {
                    socket: device.socket.clone(),
                    source,
                },
            )?;
            Ok(ServedDevice {
                name: format!("{SERIAL_PREFIX}{}", media.holder_id()),
                socket: BoundSocket::bind(&device.socket, config.access)?,
                media: Arc::new(media),
            })
        })
        .collect::<Result<Vec<_>, DaemonError>>()?;
    serve_until_signal(devices, config.pidfile.as_deref(), signals)
}

/// Announces readiness, serves every device on its own thread, and on SIGTERM or SIGINT stops
/// them, removes their sockets and the pidfile.
pub fn serve_until_signal(
    devices: Vec<ServedDevice>,
    pidfile: Option<&std::path::Path>,
    mut signals: Signals,
) -> Result<(), DaemonError> {
    announce_ready(&devices, pidfile)?;
    let stopper = Stopper::new().map_err(DaemonError::StopEvent)?;
    let threads: Vec<_> = devices
        .into_iter()
        .map(|device| {
            let stopper = stopper.clone();
            thread::Builder::new()
                .name(device.name.clone())
                .spawn(move || {
                    let served = device.socket.serve(&device.name, device.media, &stopper);
                    if served.is_err() && !stopper.is_stopped() {
                        // One broken device stops the daemon rather than leave it half-serving.
                        let _ = signal_hook::low_level::raise(SIGTERM);
                    }
                    served
                })
        })
        .collect::<Result<_, _>>()
        .map_err(DaemonError::Spawn)?;

    if let Some(signal) = signals.forever().next() {
        info!("signal {signal}: stopping");
    }
    stopper.stop();
    let mut result = Ok(());
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("{e}");
                result = Err(DaemonError::Serve(e));
            }
            Err(_) => result = Err(DaemonError::Thread),
        }
    }
    if let Some(pidfile) = pidfile {
        remove_pidfile_if_ours(pidfile);
    }
    result
}

/// Raises the soft limit on open files to the hard limit. Each connected frontend costs a
/// daemon about ten descriptors (the socket, eventfds, epoll, guest memory); the usual soft
/// limit of 1,024 runs out near 100 VMs, while the hard limit (systemd's default: 524,288, or
/// the unit's `LimitNOFILE=`) is what the operator allows. A limit that cannot be read or raised
/// is logged and left as it is.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!("open files limit raised from {soft} to {hard}"),
            Err(e) => log::warn!("open files limit {soft}: could not raise it to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => log::warn!("could not read the open files limit: {e}"),
    }
}

/// The soft limit on open files now, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Removes the pidfile only while it still names this process: another instance started since
/// may have written its own.
pub fn remove_pidfile_if_ours(path: &std::path::Path) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        info!("{}: names another process, left alone", path.display());
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        log::warn!("{}: could not remove the pidfile: {e}", path.display());
    }
}

/// Tells whoever started us that every socket listens: a line on stdout, the pidfile, and
/// sd_notify when run by systemd.
fn announce_ready(
    devices: &[ServedDevice],
    pidfile: Option<&std::path::Path>,
) -> Result<(), DaemonError> {
    let list: Vec<String> = devices
        .iter()
        .map(|d| format!("{} at {}", d.name, d.socket.path().display()))
        .collect();
    announce(
        &format!(
            "ready: serving {} device(s): {}",
            devices.len(),
            list.join(", ")
        ),
        pidfile,
    )
}

/// Writes the pidfile, tells systemd (sd_notify) and prints `ready_line` on stdout: what a
/// launcher waits for once every socket listens.
pub fn announce(ready_line: &str, pidfile: Option<&std::path::Path>) -> Result<(), DaemonError> {
    if let Some(path) = pidfile {
        let pid = format!("{}\n", std::process::id());
        files::write_atomic(path, pid.as_bytes(), 0o644, Overwrite::Replace)
            .map_err(DaemonError::Pidfile)?;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
    let mut stdout = std::io::stdout().lock();
    // A launcher waits for this line; losing it is not worth failing over.
    let _ = writeln!(stdout, "{ready_line}");
    let _ = stdout.flush();
    info!("ready");
    Ok(())
}
