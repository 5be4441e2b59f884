//! The local VCEK cache: a directory of DER files, looked up by a report's (CHIP_ID,
//! REPORTED_TCB), which is how AMD's KDS keys VCEKs. No network. Finding a VCEK here trusts
//! nothing: the verifier still checks its chain, extensions and signature.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::product::Product;
use super::report::Report;
use super::tcb::Tcb;
use super::vcek::{MAX_VCEK_LEN, Vcek};

/// A directory with more files than this is not a VCEK cache.
pub const MAX_FILES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum VcekStoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: more than {MAX_FILES} files", path.display())]
    TooManyFiles { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, VcekStoreError>;

/// One usable VCEK file.
#[derive(Debug, Clone)]
struct StoredVcek {
    path: PathBuf,
    der: Vec<u8>,
    product: Product,
    tcb: Tcb,
    hwid: Vec<u8>,
}

impl StoredVcek {
    fn matches(&self, report: &Report) -> bool {
        self.product.chip_id_matches(&self.hwid, report.chip_id())
            && Tcb::from_bytes(self.product, report.reported_tcb()) == self.tcb
    }
}

/// The VCEKs of one directory, read once.
#[derive(Debug, Clone, Default)]
pub struct VcekStore {
    entries: Vec<StoredVcek>,
    skipped: Vec<(PathBuf, String)>,
}

impl VcekStore {
    /// Reads every `*.der` file of `dir` (not recursing). A file that is not a VCEK with the
    /// extensions needed for the lookup is skipped and named in [`Self::skipped`].
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |source| VcekStoreError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|ext| ext == "der") {
                if paths.len() == MAX_FILES {
                    return Err(VcekStoreError::TooManyFiles {
                        path: dir.to_owned(),
                    });
                }
                paths.push(path);
            }
        }
        paths.sort();
        let mut store = Self::default();
        for path in paths {
            match read_vcek(&path) {
                Ok(entry) => store.entries.push(entry),
                Err(why) => {
                    log::warn!("VCEK cache: skipping {}: {why}", path.display());
                    store.skipped.push((path, why));
                }
            }
        }
        Ok(store)
    }

    /// The DER of the VCEK issued for the chip and TCB the report names.
    pub fn lookup(&self, report: &Report) -> Option<&[u8]> {
        self.lookup_path(report).map(|(_, der)| der)
    }

    /// As [`Self::lookup`], with the file it came from.
    pub fn lookup_path(&self, report: &Report) -> Option<(&Path, &[u8])> {
        self.entries
            .iter()
            .find(|entry| entry.matches(report))
            .map(|entry| (entry.path.as_path(), entry.der.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Files that were not usable VCEKs, and why.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }
}

fn read_vcek(path: &Path) -> std::result::Result<StoredVcek, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let mut der = Vec::new();
    let limit = u64::try_from(MAX_VCEK_LEN)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    file.take(limit)
        .read_to_end(&mut der)
        .map_err(|e| e.to_string())?;
    let vcek = Vcek::from_der(&der).map_err(|e| e.to_string())?;
    let info = vcek.info().map_err(|e| e.to_string())?;
    Ok(StoredVcek {
        path: path.to_owned(),
        der,
        product: info.product,
        tcb: info.tcb,
        hwid: info.hwid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::fixtures::{MILAN_VCEK_DER, milan_report_bytes};

    #[test]
    fn finds_the_vcek_by_chip_and_tcb() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("milan.der"), MILAN_VCEK_DER).unwrap();
        fs::write(dir.path().join("junk.der"), b"junk").unwrap();
        fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let store = VcekStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.skipped().len(), 1);

        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        let (path, der) = store.lookup_path(&report).unwrap();
        assert_eq!(der, MILAN_VCEK_DER);
        assert!(path.ends_with("milan.der"));

        // Another TCB, or another chip: no VCEK.
        let mut bytes = milan_report_bytes();
        bytes[0x187] = 116;
        assert!(store.lookup(&Report::from_bytes(&bytes).unwrap()).is_none());
        let mut bytes = milan_report_bytes();
        bytes[0x1A0] ^= 1;
        assert!(store.lookup(&Report::from_bytes(&bytes).unwrap()).is_none());
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        assert!(matches!(
            VcekStore::open(Path::new("/nonexistent/vceks")),
            Err(VcekStoreError::Io { .. })
        ));
    }
}
