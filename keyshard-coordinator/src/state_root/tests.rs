//! The state root watch, scan by scan, on states without attested holders (no TPM needed; the
//! TPM-backed path runs in keyshard's `tests/state_root.rs` against swtpm).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use keyshard_core::files::Overwrite;
use keyshard_core::policy::Policy;

use super::*;
use crate::init::init;

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
    assert_eq!(
        server.watch_once(),
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
    assert_eq!(server.watch_once(), [Event::Reloaded { vm: "vm1".into() }]);
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
    let [Event::Refused { vm, reason }, Event::Serving { .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(vm, "vm1");
    assert!(reason.contains("state.toml"), "{reason}");
    assert_eq!(server.served(), ["vm2"]);
    // Its mailbox is there, answering with the reason; the same reason is not reported again.
    assert!(socket(root.path(), "vm1").exists());
    assert_eq!(server.watch_once(), []);

    deal(root.path(), "vm1", "vm1", Overwrite::Replace);
    server.watch_once();
    let events = server.watch_once();
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
    server.watch_once();
    let events = server.watch_once();
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
