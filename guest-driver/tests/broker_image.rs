//! `keyshard-guest unlock --broker-device IMAGE`: the broker mailbox as a 32 KiB image file, with
//! a coordinator double in the test that watches the request area and writes its answers into
//! the answer area, as the mailbox device does. The whole command runs: arguments, O_DIRECT
//! writes and polls, envelope, quorum, stdout, stderr and the exit code.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Fixture, SECRET, keyshard_guest};
use keyshard_core::HolderClass;
use keyshard_core::broker::{AREA_LEN, Body, Message, RefusalCode};
use keyshard_core::dealer::HolderSlot;
use keyshard_core::envelope::{self, ReleaseContext};

/// vhd-1, vhd-2 and tpm-1, all three needed.
fn fixture() -> Fixture {
    Fixture::dealt(
        HolderSlot::numbered(HolderClass::Vhd, 2)
            .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
            .collect(),
        3,
    )
}

/// A coordinator double serving a mailbox image until dropped: each new request reads back
/// `pending` for a while, then `decide`'s answer.
struct FileCoordinator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl FileCoordinator {
    fn serve(image: PathBuf, decide: impl Fn(&Message) -> Body + Send + 'static) -> Self {
        fs::write(&image, vec![0u8; 2 * AREA_LEN]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .unwrap();
            let mut answered = 0;
            let mut last = None;
            while !stopping.load(Ordering::Relaxed) {
                let mut request = vec![0u8; AREA_LEN];
                file.read_exact_at(&mut request, 0).unwrap();
                if let Ok(message) = Message::parse(&request)
                    && last != Some(message.request_id)
                {
                    last = Some(message.request_id);
                    publish(&file, message.request_id, Body::Pending);
                    std::thread::sleep(Duration::from_millis(20));
                    publish(&file, message.request_id, decide(&message));
                    answered += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            answered
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops serving; how many requests were answered.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FileCoordinator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn publish(file: &fs::File, request_id: u64, body: Body) {
    let mut area = Message { request_id, body }.encode().unwrap();
    area.resize(AREA_LEN, 0);
    file.write_all_at(&area, AREA_LEN as u64).unwrap();
}

fn releasing(fixture: &Fixture) -> impl Fn(&Message) -> Body + Send + 'static {
    let fragment = fixture.fragments[2].clone();
    move |request| {
        let Body::Release {
            class,
            holder_id,
            request_key,
            evidence,
        } = &request.body
        else {
            panic!("{request:?}");
        };
        let context = ReleaseContext {
            request_id: request.request_id,
            class: *class,
            holder_id: holder_id.clone(),
        };
        Body::Released {
            class: *class,
            holder_id: holder_id.clone(),
            envelope: envelope::seal(request_key, &fragment, &context).unwrap(),
            host_quote: common::host_quote(evidence),
        }
    }
}

fn unlock(fixture: &Fixture, broker: &Path) -> std::process::Output {
    keyshard_guest(&[
        "unlock",
        "--manifest",
        fixture.manifest_path().to_str().unwrap(),
        "--device",
        fixture.images[0].to_str().unwrap(),
        "--device",
        fixture.images[1].to_str().unwrap(),
        "--broker-device",
        broker.to_str().unwrap(),
        "--timeout",
        "5",
    ])
}

#[test]
fn two_images_and_the_brokered_tpm_share_give_the_secret() {
    let fixture = fixture();
    let broker = fixture.dir.path().join("ksb.img");
    let coordinator = FileCoordinator::serve(broker.clone(), releasing(&fixture));
    let run = unlock(&fixture, &broker);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert_eq!(run.stdout, SECRET);
    assert!(
        stderr.contains(&format!(
            "from 3 fragments (k = 3): {}, {}, tpm-1 (broker {})",
            fixture.images[0].display(),
            fixture.images[1].display(),
            broker.display()
        )),
        "{stderr}"
    );
    assert_eq!(coordinator.finish(), 1);
}

#[test]
fn a_refused_tpm_share_is_named_with_the_reason_and_exits_2() {
    let fixture = fixture();
    let broker = fixture.dir.path().join("ksb.img");
    let _coordinator = FileCoordinator::serve(broker.clone(), |_| Body::Refused {
        code: RefusalCode::HostAttestation,
        reason: "PCR 7 differs from its golden value".into(),
    });
    let run = unlock(&fixture, &broker);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(run.stdout.is_empty());
    assert!(
        stderr.contains(
            "keyshard-guest: missing tpm-1: refused by the coordinator: PCR 7 differs from its \
             golden value\n"
        ),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(
            "keyshard-guest: quorum not met: 2 valid fragment(s) of one epoch, 3 needed\n"
        ),
        "{stderr}"
    );
}

#[test]
fn a_silent_broker_costs_the_timeout_and_is_named() {
    let fixture = fixture();
    let broker = fixture.dir.path().join("ksb.img");
    // An image nobody answers in.
    fs::write(&broker, vec![0u8; 2 * AREA_LEN]).unwrap();
    let start = std::time::Instant::now();
    let run = keyshard_guest(&[
        "unlock",
        "--manifest",
        fixture.manifest_path().to_str().unwrap(),
        "--device",
        fixture.images[0].to_str().unwrap(),
        "--device",
        fixture.images[1].to_str().unwrap(),
        "--broker-device",
        broker.to_str().unwrap(),
        "--timeout",
        "0.5",
    ]);
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        stderr.contains(
            "keyshard-guest: missing tpm-1: no final answer from the coordinator before the \
             deadline (the answer area stayed empty)"
        ),
        "{stderr}"
    );
    // The request is there, padded to whole 4 KiB blocks.
    let image = fs::read(&broker).unwrap();
    let request = Message::parse(&image[..AREA_LEN]).unwrap();
    assert!(matches!(
        request.body,
        Body::Release {
            class: HolderClass::Tpm,
            ..
        }
    ));
}

/// Review of issue 7: through the broker worker too, no holder is asked for a share once the
/// quorum is met (the worker waits for the agent's go-ahead before each next request).
#[test]
fn no_holder_is_asked_once_the_quorum_is_met() {
    let fixture = Fixture::dealt(
        HolderSlot::numbered(HolderClass::Vhd, 2)
            .chain(HolderSlot::numbered(HolderClass::Tpm, 2))
            .collect(),
        3,
    );
    let fragments = fixture.fragments.clone();
    let broker = fixture.dir.path().join("ksb.img");
    let coordinator = FileCoordinator::serve(broker.clone(), move |request| {
        let Body::Release {
            class,
            holder_id,
            request_key,
            evidence,
        } = &request.body
        else {
            panic!("{request:?}");
        };
        // The devices answer first; then tpm-1's share makes k.
        std::thread::sleep(Duration::from_millis(300));
        let fragment = if holder_id.to_string() == "tpm-1" {
            &fragments[2]
        } else {
            &fragments[3]
        };
        let context = ReleaseContext {
            request_id: request.request_id,
            class: *class,
            holder_id: holder_id.clone(),
        };
        Body::Released {
            class: *class,
            holder_id: holder_id.clone(),
            envelope: envelope::seal(request_key, fragment, &context).unwrap(),
            host_quote: common::host_quote(evidence),
        }
    });
    let run = unlock(&fixture, &broker);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.stdout, SECRET);
    // A worker that went on would have written its next request by now.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(coordinator.finish(), 1);
}
