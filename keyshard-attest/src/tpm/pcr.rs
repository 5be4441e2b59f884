//! PCR selections and PCR values ("golden values"): validation, the golden-value record format,
//! the composite digest that PolicyPCR and TPM2_Quote use, and naming the PCRs that changed.
//!
//! Golden-value record (all integers big-endian), as written by [`PcrValues::to_bytes`]:
//!
//! ```text
//! offset  size        field
//! 0       4           magic "KSPV"
//! 4       1           version = 1
//! 5       2           bank: TPM_ALG_ID (0x0004 sha1, 0x000b sha256, 0x000c sha384)
//! 7       1           count: 1..=24
//! 8       count * (1 + L)   per PCR, ascending index: index (0..=23), value (L bytes:
//!                           20 sha1, 32 sha256, 48 sha384)
//! ```
//! Nothing may follow; every other input is refused with a [`PcrError`].

use std::fmt;

use keyshard_core::policy::{PcrBank, TpmPolicy};
use sha2::{Digest as _, Sha256};

use super::spec::{self, PCR_COUNT, PCR_SELECT_SIZE};
use super::wire::{Reader, WireError};

const RECORD_MAGIC: [u8; 4] = *b"KSPV";
const RECORD_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcrError {
    #[error("no PCRs selected")]
    Empty,
    #[error("PCR {index} does not exist (0..=23)")]
    OutOfRange { index: u8 },
    #[error("PCR {index} is listed twice")]
    Duplicate { index: u8 },
    #[error("PCR {index} is listed out of order")]
    NotAscending { index: u8 },
    #[error("PCR {index}: a {bank} value has {expected} bytes, not {found}")]
    ValueLength {
        index: u8,
        bank: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("not a PCR value record (bad magic)")]
    Magic,
    #[error("PCR value record version {0} is not supported")]
    Version(u8),
    #[error("unknown PCR bank algorithm {0:#06x}")]
    UnknownBank(u16),
    #[error("PCR value record: {0}")]
    Wire(#[from] WireError),
    #[error("PCR selections differ: expected {expected}, found {found}")]
    SelectionMismatch { expected: String, found: String },
    #[error("PCR selection {text:?}: {reason} (expected e.g. sha256:0,7)")]
    SelectionSyntax { text: String, reason: &'static str },
}

pub type Result<T> = std::result::Result<T, PcrError>;

/// One PCR bank and a set of PCR indices, kept sorted and unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    bank: PcrBank,
    indices: Vec<u8>,
}

impl PcrSelection {
    /// Checks the indices (1 to 24 of them, each 0..=23, no repeats); any order is accepted.
    pub fn new(bank: PcrBank, indices: &[u8]) -> Result<Self> {
        let mut sorted = Vec::with_capacity(indices.len());
        for &index in indices {
            if index >= PCR_COUNT {
                return Err(PcrError::OutOfRange { index });
            }
            match sorted.binary_search(&index) {
                Ok(_) => return Err(PcrError::Duplicate { index }),
                Err(at) => sorted.insert(at, index),
            }
        }
        if sorted.is_empty() {
            return Err(PcrError::Empty);
        }
        Ok(Self {
            bank,
            indices: sorted,
        })
    }

    pub fn bank(&self) -> PcrBank {
        self.bank
    }

    /// The indices, ascending: the order of PCR_Read results and of every PCR digest.
    pub fn indices(&self) -> &[u8] {
        &self.indices
    }

    /// The 3-byte PCR bitmap (TPMS_PCR_SELECTION.pcrSelect).
    pub fn bitmap(&self) -> [u8; PCR_SELECT_SIZE as usize] {
        let mut map = [0u8; PCR_SELECT_SIZE as usize];
        for &index in &self.indices {
            if let Some(byte) = map.get_mut(usize::from(index / 8)) {
                *byte |= 1 << (index % 8);
            }
        }
        map
    }

    /// The marshalled TPML_PCR_SELECTION with this one bank: what PolicyPCR hashes.
    pub fn tpml_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&spec::bank_alg(self.bank).to_be_bytes());
        out.push(PCR_SELECT_SIZE);
        out.extend_from_slice(&self.bitmap());
        out
    }

    /// Appends this selection in its TPMS_PCR_SELECTION wire form (hash, size, bitmap).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&spec::bank_alg(self.bank).to_be_bytes());
        // At most 24 indices: the count fits a byte.
        out.push(u8::try_from(self.indices.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.indices);
    }

    /// Reads one TPMS_PCR_SELECTION written by [`PcrSelection::write`].
    pub fn read(r: &mut Reader<'_>) -> Result<Self> {
        let bank = read_bank(r)?;
        let count = r.u8("PCR count")?;
        let indices = r.bytes(usize::from(count), "PCR indices")?;
        check_ascending(indices.iter().copied())?;
        Self::new(bank, indices)
    }
}

impl TryFrom<&TpmPolicy> for PcrSelection {
    type Error = PcrError;

    fn try_from(policy: &TpmPolicy) -> Result<Self> {
        Self::new(policy.pcr_bank, &policy.pcrs)
    }
}

/// "sha256:0,7"
impl fmt::Display for PcrSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.bank.as_str())?;
        for (n, index) in self.indices.iter().enumerate() {
            let sep = if n > 0 { "," } else { "" };
            write!(f, "{sep}{index}")?;
        }
        Ok(())
    }
}

/// Parses what [`fmt::Display`] writes: a bank (`sha1`, `sha256`, `sha384`), `:`, and 1 to 24
/// decimal indices 0..=23 separated by `,` (any order; no repeats, no spaces).
impl std::str::FromStr for PcrSelection {
    type Err = PcrError;

    fn from_str(text: &str) -> Result<Self> {
        let syntax = |reason| PcrError::SelectionSyntax {
            text: text.chars().take(64).collect(),
            reason,
        };
        let (bank, list) = text.split_once(':').ok_or_else(|| syntax("no ':'"))?;
        let bank = [PcrBank::Sha1, PcrBank::Sha256, PcrBank::Sha384]
            .into_iter()
            .find(|b| b.as_str() == bank)
            .ok_or_else(|| syntax("the bank is not sha1, sha256 or sha384"))?;
        let mut indices = Vec::new();
        for item in list.split(',') {
            if item.is_empty() || item.len() > 2 || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax("an index is not a number 0..=23"));
            }
            if indices.len() >= usize::from(PCR_COUNT) {
                return Err(syntax("more than 24 indices"));
            }
            indices.push(
                item.parse::<u8>()
                    .map_err(|_| syntax("an index is not a number"))?,
            );
        }
        Self::new(bank, &indices)
    }
}

/// PCR values of one bank, by index: golden values recorded at provisioning, or what PCR_Read
/// returns now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrValues {
    selection: PcrSelection,
    /// One value per selected index, in the selection's (ascending) order.
    values: Vec<Vec<u8>>,
}

impl PcrValues {
    /// Checks that the indices are valid and every value has the bank's digest length.
    pub fn new(bank: PcrBank, values: Vec<(u8, Vec<u8>)>) -> Result<Self> {
        let indices: Vec<u8> = values.iter().map(|(index, _)| *index).collect();
        let selection = PcrSelection::new(bank, &indices)?;
        let mut values = values;
        values.sort_by_key(|(index, _)| *index);
        let expected = spec::digest_len(bank);
        for (index, value) in &values {
            if value.len() != expected {
                return Err(PcrError::ValueLength {
                    index: *index,
                    bank: bank.as_str(),
                    expected,
                    found: value.len(),
                });
            }
        }
        Ok(Self {
            selection,
            values: values.into_iter().map(|(_, value)| value).collect(),
        })
    }

    pub fn bank(&self) -> PcrBank {
        self.selection.bank
    }

    pub fn selection(&self) -> &PcrSelection {
        &self.selection
    }

    /// The value of PCR `index`, if it is part of the selection.
    pub fn get(&self, index: u8) -> Option<&[u8]> {
        self.iter().find(|(i, _)| *i == index).map(|(_, v)| v)
    }

    /// (index, value), ascending by index.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.selection
            .indices
            .iter()
            .copied()
            .zip(self.values.iter().map(Vec::as_slice))
    }

    /// SHA-256 over the values in ascending index order: the pcrDigest of PolicyPCR in a
    /// SHA-256 session and of a quote signed with an ECDSA-SHA256 key, for every bank.
    pub fn composite_digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for value in &self.values {
            hash.update(value);
        }
        hash.finalize().into()
    }

    /// The PolicyPCR policy digest for these values, from an empty SHA-256 policy
    /// (TPM 2.0 Part 3, TPM2_PolicyPCR): H(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION ||
    /// pcrDigest). A sealed object with this authPolicy unseals only while the PCRs hold these
    /// values.
    pub fn policy_digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update([0u8; 32]);
        hash.update(spec::TPM_CC_POLICY_PCR.to_be_bytes());
        hash.update(self.selection.tpml_bytes());
        hash.update(self.composite_digest());
        hash.finalize().into()
    }

    /// The record format described at the top of this module.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&RECORD_MAGIC);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&spec::bank_alg(self.bank()).to_be_bytes());
        out.push(u8::try_from(self.values.len()).unwrap_or(u8::MAX));
        for (index, value) in self.iter() {
            out.push(index);
            out.extend_from_slice(value);
        }
        out
    }

    /// Parses a record strictly: magic, version, known bank, ascending indices, exact length.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != RECORD_MAGIC {
            return Err(PcrError::Magic);
        }
        let version = r.u8("version")?;
        if version != RECORD_VERSION {
            return Err(PcrError::Version(version));
        }
        let bank = read_bank(&mut r)?;
        let count = r.u8("PCR count")?;
        let len = spec::digest_len(bank);
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let index = r.u8("PCR index")?;
            let value = r.bytes(len, "PCR value")?;
            values.push((index, value.to_vec()));
        }
        r.finish()?;
        check_ascending(values.iter().map(|(index, _)| *index))?;
        Self::new(bank, values)
    }
}

/// The PCRs whose current value differs from the golden one, ascending ("PCR 7" after a PCR 7
/// extend). Both must cover the same bank and indices.
pub fn differing_pcrs(golden: &PcrValues, current: &PcrValues) -> Result<Vec<u8>> {
    if golden.selection != current.selection {
        return Err(PcrError::SelectionMismatch {
            expected: golden.selection.to_string(),
            found: current.selection.to_string(),
        });
    }
    Ok(golden
        .iter()
        .zip(current.iter())
        .filter(|((_, g), (_, c))| g != c)
        .map(|((index, _), _)| index)
        .collect())
}

fn read_bank(r: &mut Reader<'_>) -> Result<PcrBank> {
    let alg = r.u16("PCR bank")?;
    spec::bank_from_alg(alg).ok_or(PcrError::UnknownBank(alg))
}

fn check_ascending(indices: impl Iterator<Item = u8>) -> Result<()> {
    let mut last: Option<u8> = None;
    for index in indices {
        if last.is_some_and(|l| index <= l) {
            return Err(PcrError::NotAscending { index });
        }
        last = Some(index);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> PcrValues {
        PcrValues::new(
            PcrBank::Sha256,
            vec![(7, vec![7u8; 32]), (0, vec![0u8; 32])],
        )
        .unwrap()
    }

    #[test]
    fn selections_parse_what_they_print_and_nothing_else() {
        for text in ["sha256:0,7", "sha1:23", "sha384:0,1,2,3,4,5,6,7"] {
            let sel: PcrSelection = text.parse().unwrap();
            assert_eq!(sel.to_string(), text);
        }
        let sorted: PcrSelection = "sha256:7,0".parse().unwrap();
        assert_eq!(sorted.indices(), &[0, 7]);
        for (text, expected) in [
            ("sha256", "no ':'"),
            ("md5:0", "bank"),
            ("sha256:", "not a number"),
            ("sha256:0,,7", "not a number"),
            ("sha256: 0", "not a number"),
            ("sha256:-1", "not a number"),
            ("sha256:007", "not a number"),
            ("sha256:24", "does not exist"),
            ("sha256:7,7", "twice"),
        ] {
            let err = text.parse::<PcrSelection>().unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn selection_sorts_and_refuses_bad_indices() {
        let sel = PcrSelection::new(PcrBank::Sha256, &[7, 0, 23]).unwrap();
        assert_eq!(sel.indices(), &[0, 7, 23]);
        assert_eq!(sel.to_string(), "sha256:0,7,23");
        assert_eq!(sel.bitmap(), [0x81, 0x00, 0x80]);
        assert_eq!(
            PcrSelection::new(PcrBank::Sha256, &[]),
            Err(PcrError::Empty)
        );
        assert_eq!(
            PcrSelection::new(PcrBank::Sha1, &[24]),
            Err(PcrError::OutOfRange { index: 24 })
        );
        assert_eq!(
            PcrSelection::new(PcrBank::Sha1, &[7, 1, 7]),
            Err(PcrError::Duplicate { index: 7 })
        );
    }

    #[test]
    fn selection_comes_from_the_sharing_policy() {
        let policy = TpmPolicy {
            pcr_bank: PcrBank::Sha384,
            pcrs: vec![7, 0],
        };
        let sel = PcrSelection::try_from(&policy).unwrap();
        assert_eq!(sel.bank(), PcrBank::Sha384);
        assert_eq!(sel.indices(), &[0, 7]);
    }

    #[test]
    fn tpml_encoding_matches_the_spec() {
        let sel = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        assert_eq!(sel.tpml_bytes(), [0, 0, 0, 1, 0, 0x0b, 3, 0x81, 0, 0]);
    }

    #[test]
    fn values_must_have_the_bank_length() {
        assert_eq!(
            PcrValues::new(PcrBank::Sha1, vec![(0, vec![0u8; 32])]),
            Err(PcrError::ValueLength {
                index: 0,
                bank: "sha1",
                expected: 20,
                found: 32
            })
        );
    }

    #[test]
    fn policy_digest_matches_the_tpm() {
        // PCRs 0 and 7 of an swtpm after two extends, and the policy digest that swtpm's own
        // trial session computed for them (PolicyPCR, sha256:0,7).
        let values = PcrValues::new(
            PcrBank::Sha256,
            vec![
                (
                    0,
                    hex::decode("fd02b276917e115f004716d7267b3a81599d64ef61a271cf04f24ea1efb85d5f")
                        .unwrap(),
                ),
                (
                    7,
                    hex::decode("699d15c6acbcd6a4be30c086421ff087ef3774ea49d361ba188f805c07f05137")
                        .unwrap(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            hex::encode(values.policy_digest()),
            "2993214f444bb71eaa2ce7e6f476b1b04345159864a4e81055e75a0275245087"
        );
        assert_ne!(golden().policy_digest(), values.policy_digest());
    }

    #[test]
    fn record_round_trips() {
        let g = golden();
        let bytes = g.to_bytes();
        assert_eq!(bytes.len(), 8 + 2 * 33);
        assert_eq!(&bytes[..8], b"KSPV\x01\x00\x0b\x02");
        assert_eq!(PcrValues::parse(&bytes).unwrap(), g);
        assert_eq!(g.get(7), Some(&[7u8; 32][..]));
        assert_eq!(g.get(1), None);
    }

    #[test]
    fn record_parser_refuses_truncated_and_tampered_input() {
        let bytes = golden().to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                PcrValues::parse(&bytes[..cut]).is_err(),
                "a record cut at {cut} bytes parsed"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            PcrValues::parse(&long),
            Err(PcrError::Wire(WireError::Trailing { extra: 1, .. }))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(PcrValues::parse(&bad), Err(PcrError::Magic));
        let mut bad = bytes.clone();
        bad[4] = 2;
        assert_eq!(PcrValues::parse(&bad), Err(PcrError::Version(2)));
        let mut bad = bytes.clone();
        bad[6] = 0x0d;
        assert_eq!(PcrValues::parse(&bad), Err(PcrError::UnknownBank(0x0d)));
        // the second index (7) rewritten to 0: repeated, so out of order
        let mut bad = bytes.clone();
        bad[8 + 33] = 0;
        assert_eq!(
            PcrValues::parse(&bad),
            Err(PcrError::NotAscending { index: 0 })
        );
        let mut bad = bytes.clone();
        bad[8] = 30;
        assert!(PcrValues::parse(&bad).is_err(), "index 30 was accepted");
        // count says 3, only two entries follow
        let mut bad = bytes;
        bad[7] = 3;
        assert!(matches!(
            PcrValues::parse(&bad),
            Err(PcrError::Wire(WireError::Truncated { .. }))
        ));
    }

    #[test]
    fn differing_pcrs_names_the_changed_ones() {
        let g = golden();
        assert_eq!(differing_pcrs(&g, &g).unwrap(), Vec::<u8>::new());
        let changed = PcrValues::new(
            PcrBank::Sha256,
            vec![(0, vec![0u8; 32]), (7, vec![9u8; 32])],
        )
        .unwrap();
        assert_eq!(differing_pcrs(&g, &changed).unwrap(), vec![7]);
        let other = PcrValues::new(PcrBank::Sha256, vec![(0, vec![0u8; 32])]).unwrap();
        assert_eq!(
            differing_pcrs(&g, &other),
            Err(PcrError::SelectionMismatch {
                expected: "sha256:0,7".into(),
                found: "sha256:0".into()
            })
        );
    }
}
