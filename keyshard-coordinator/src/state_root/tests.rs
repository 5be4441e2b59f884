//! The state root watch, scan by scan, on states without attested holders (no TPM needed; the
//! TPM-backed path runs in keyshard's `tests/state_root.rs` against swtpm).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use keyshard_core::files::Overwrite;
use keyshard_core::policy::Policy;

use super::*;
use crate::init::init;
use crate::state::StateDir;

const VHD_ONLY: &str = "allow_host_reachable_quorum = true\nthreshold = 2\n[holders]\nvhd = 2\n";

fn deal(root: &Path, name: &str, bound: &str, overwrite: Overwrite) {
    init(
        &StateDir::new(root.join(name)),
        &Policy::parse(VHD_ONLY).unwrap(),
        &[7; 32],
        &keyshard_core::keys::generate().unwrap(),
        None,
        overwrite,
        &[bound.to_owned()],
    )
    .unwrap();
}

fn start(root: &Path) -> (StateRootServer, Vec<Event>) {
    StateRootServer::start(root, SocketAccess::default(), "unused".into()).unwrap()
}

fn root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Watches until something happens (at most 5 s), as the CLI's loop does.
fn next_events(server: &mut StateRootServer) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = server.watch_once();
        if !events.is_empty() || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn socket(root: &Path, name: &str) -> PathBuf {
    root.join(name).join(scan::BROKER_SOCKET)
}

#[test]
fn a_vm_added_is_served_once_two_scans_agree() {
    let root = root();
    let (mut server, events) = start(root.path());
    assert!(events.is_empty(), "{events:?}");
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    assert_eq!(server.watch_once(), [], "loaded before it settled");
    assert!(!socket(root.path(), "vm1").exists());
    assert_eq!(
        next_events(&mut server),
        [Event::Serving {
            vm: "vm1".into(),
            socket: socket(root.path(), "vm1"),
        }]
    );
    assert_eq!(server.served(), ["vm1"]);
    assert!(socket(root.path(), "vm1").exists());
    assert_eq!(server.watch_once(), []);
    server.stop();
    assert!(!socket(root.path(), "vm1").exists());
}

#[test]
fn a_directory_without_its_state_file_is_never_served() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    std::fs::remove_file(root.path().join("vm1/state.toml")).unwrap();
    let (mut server, _) = start(root.path());
    for _ in 0..3 {
        assert_eq!(server.watch_once(), []);
    }
    assert!(server.served().is_empty());
    assert!(!socket(root.path(), "vm1").exists());
}

#[test]
fn a_changed_state_is_swapped_in_behind_the_same_socket() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let (mut server, events) = start(root.path());
    assert_eq!(events.len(), 1, "{events:?}");
    let inode = std::fs::metadata(socket(root.path(), "vm1")).unwrap().ino();
    deal(root.path(), "vm1", "vm1", Overwrite::Replace);
    assert_eq!(server.watch_once(), []);
    assert_eq!(
        next_events(&mut server),
        [Event::Reloaded { vm: "vm1".into() }]
    );
    let after = std::fs::metadata(socket(root.path(), "vm1")).unwrap().ino();
    assert_eq!(inode, after, "the socket was bound again");
    server.stop();
}

#[test]
fn a_broken_state_is_refused_with_the_reason_and_served_once_repaired() {
    let root = root();
    std::fs::create_dir(root.path().join("vm1")).unwrap();
    std::fs::write(root.path().join("vm1/state.toml"), "version = 99\n").unwrap();
    deal(root.path(), "vm2", "vm2", Overwrite::Refuse);
    let (mut server, events) = start(root.path());
    // Loads run side by side: their events come in either order.
    assert_eq!(events.len(), 2, "{events:?}");
    let Some(Event::Refused { reason, .. }) = events
        .iter()
        .find(|e| matches!(e, Event::Refused { vm, .. } if vm == "vm1"))
    else {
        panic!("{events:?}");
    };
    assert!(reason.contains("state.toml"), "{reason}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Serving { vm, .. } if vm == "vm2")),
        "{events:?}"
    );
    assert_eq!(server.served(), ["vm2"]);
    // Its mailbox is there, answering with the reason; the same reason is not reported again.
    assert!(socket(root.path(), "vm1").exists());
    assert_eq!(server.watch_once(), []);

    deal(root.path(), "vm1", "vm1", Overwrite::Replace);
    let events = next_events(&mut server);
    assert!(
        matches!(events.as_slice(), [Event::Serving { vm, .. }] if vm == "vm1"),
        "{events:?}"
    );
    assert_eq!(server.served(), ["vm1", "vm2"]);
    server.stop();
}

#[test]
fn a_directory_named_for_a_vm_the_key_is_not_bound_to_is_refused() {
    let root = root();
    deal(root.path(), "vm1", "vm9", Overwrite::Refuse);
    let (server, events) = start(root.path());
    let [Event::Refused { reason, .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert!(
        reason.contains("bound to VM ids [vm9], not to vm1"),
        "{reason}"
    );
    assert!(server.served().is_empty());
    server.stop();
}

#[test]
fn a_vm_directory_others_may_write_gets_no_socket_and_a_served_one_is_stopped() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let (mut server, _) = start(root.path());
    assert_eq!(server.served(), ["vm1"]);
    std::fs::set_permissions(
        root.path().join("vm1"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let events = next_events(&mut server);
    assert!(
        matches!(events.as_slice(), [Event::Refused { reason, .. }] if reason.contains("writable by group or others")),
        "{events:?}"
    );
    assert!(server.served().is_empty());
    // Its thread stops on its own time: the socket goes with it, within a few scans.
    let deadline = Instant::now() + Duration::from_secs(5);
    while socket(root.path(), "vm1").exists() {
        assert!(Instant::now() < deadline, "the socket outlived its VM");
        std::thread::sleep(Duration::from_millis(20));
        server.watch_once();
    }
    server.stop();
}

#[test]
fn a_root_others_may_write_is_refused() {
    let root = root();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let Err(error) = StateRootServer::start(root.path(), SocketAccess::default(), String::new())
    else {
        panic!("started on a world-writable root");
    };
    assert!(
        error.to_string().contains("writable by group or others"),
        "{error}"
    );
}

/// A nonce asked over the VM's broker socket, as a guest would.
fn nonce_over(socket: &Path) -> Result<(), String> {
    let mut client = guest_driver::broker::BrokerClient::new(Box::new(
        guest_driver::broker::mailbox::VhostUserMailbox::new(socket.to_owned()),
    ));
    client
        .nonce(Instant::now() + Duration::from_secs(10))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Watches until `done` holds (at most 5 s); returns every event seen on the way.
fn watch_until(server: &mut StateRootServer, done: impl Fn() -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    while !done() {
        assert!(Instant::now() < deadline, "not done within 5 s: {events:?}");
        std::thread::sleep(Duration::from_millis(10));
        events.extend(server.watch_once());
    }
    events
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Review H1: a socket file removed under the coordinator was never bound again, and the VM
/// went unserved for good. It is bound again, behind the same state, without a reload.
#[test]
fn a_socket_removed_under_the_coordinator_is_bound_again_without_a_reload() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let (mut server, _) = start(root.path());
    let path = socket(root.path(), "vm1");
    nonce_over(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let events = watch_until(&mut server, || is_socket(&path));
    assert_eq!(events, [], "a rebind is not a reload");
    nonce_over(&path).unwrap();
    server.stop();
}

/// Review H1: a VM directory replaced by a rename (dealt as `.new`, moved into place) kept
/// serving from the moved-away directory and said `reloaded`. Now its socket is bound at the
/// new directory, and the new state answers there.
#[test]
fn a_vm_directory_replaced_by_a_rename_is_served_at_its_path() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let (mut server, _) = start(root.path());
    let path = socket(root.path(), "vm1");
    let before = std::fs::metadata(&path).unwrap().ino();
    deal(root.path(), ".new", "vm1", Overwrite::Refuse);
    std::fs::rename(root.path().join("vm1"), root.path().join(".old")).unwrap();
    std::fs::rename(root.path().join(".new"), root.path().join("vm1")).unwrap();
    let events = watch_until(&mut server, || {
        std::fs::metadata(&path).is_ok_and(|m| m.ino() != before)
    });
    let events = [events, next_events(&mut server)].concat();
    assert!(
        events.contains(&Event::Reloaded { vm: "vm1".into() }),
        "{events:?}"
    );
    nonce_over(&path).unwrap();
    server.stop();
}

#[test]
fn a_state_directory_given_as_the_root_is_refused_naming_the_other_option() {
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let Err(error) = StateRootServer::start(
        &root.path().join("vm1"),
        SocketAccess::default(),
        String::new(),
    ) else {
        panic!("a state directory served as a root");
    };
    assert!(error.to_string().contains("--state-dir"), "{error}");
    assert!(!root.path().join("vm1").join(LOCK_FILE).exists());
}

/// Second review M-A: binding a replaced socket again cut the VM connected to the old one (its
/// QEMU stays connected for the VM's life). The old connection is now left to finish.
#[test]
fn a_rebind_leaves_the_connected_frontend_alone() {
    use guest_driver::vhost_user::VhostUserBlk;
    let root = root();
    deal(root.path(), "vm1", "vm1", Overwrite::Refuse);
    let (mut server, _) = start(root.path());
    let path = socket(root.path(), "vm1");
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut connected = VhostUserBlk::connect(&path, deadline()).unwrap();
    assert_eq!(
        connected.serial(deadline()).unwrap().as_deref(),
        Some("ksb-vm1")
    );
    std::fs::remove_file(&path).unwrap();
    watch_until(&mut server, || is_socket(&path));
    // The new socket serves, and the old connection still answers.
    nonce_over(&path).unwrap();
    assert_eq!(
        connected.serial(deadline()).unwrap().as_deref(),
        Some("ksb-vm1")
    );
    drop(connected);
    server.stop();
}
