//! Block devices served in-process by the vhost-keyshard engine, each on its own socket and
//! thread: what a test's frontend connects to. Stopped and joined at the end, or on drop when
//! a test fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_keyshard::device::media::BlockMedia;
use vhost_keyshard::device::serve::{BoundSocket, ServeError, Stopper};

pub struct Devices {
    pub dir: tempfile::TempDir,
    stopper: Arc<Stopper>,
    threads: Vec<JoinHandle<Result<(), ServeError>>>,
}

impl Devices {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            stopper: Stopper::new().unwrap(),
            threads: Vec::new(),
        }
    }

    /// Binds `<name>.sock` now (so it accepts connections on return) and serves `media` on it.
    pub fn serve(&mut self, name: &str, media: Arc<dyn BlockMedia>) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.sock"));
        let bound = BoundSocket::bind(&path, Default::default()).unwrap();
        let stopper = self.stopper.clone();
        let name = name.to_owned();
        self.threads.push(std::thread::spawn(move || {
            bound.serve(&name, media, &stopper)
        }));
        path
    }

    /// Stops every server and checks that each ended cleanly.
    pub fn stop(mut self) {
        self.stopper.stop();
        for thread in self.threads.drain(..) {
            thread.join().unwrap().unwrap();
        }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.stopper.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
