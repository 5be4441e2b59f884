//! Device serials: how the raw bytes a device reports become printable text, which holder a
//! fragment device's serial (`ksf-<holder-id>`) names, and which serials are broker mailboxes'
//! (`ksb-<vm-id>`).

use keyshard_core::HolderId;

/// The serial prefix of a fragment device.
pub const FRAGMENT_SERIAL_PREFIX: &str = "ksf-";
/// The serial prefix of a broker mailbox device.
pub const BROKER_SERIAL_PREFIX: &str = keyshard_core::broker::SERIAL_PREFIX;

/// A serial as text: cut at the first NUL, surrounding whitespace trimmed, and every character
/// that is not printable ASCII replaced by `?`, so a device cannot write escape sequences to a
/// terminal through an error message.
pub fn printable(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    let text = raw.get(..end).unwrap_or_default().trim_ascii();
    text.iter()
        .map(|b| match b {
            0x20..=0x7e => char::from(*b),
            _ => '?',
        })
        .collect()
}

/// The holder a serial names, when it is a fragment device's serial (`ksf-vhd-1` → `vhd-1`).
pub fn holder_id(serial: &str) -> Option<HolderId> {
    serial
        .strip_prefix(FRAGMENT_SERIAL_PREFIX)
        .and_then(|id| HolderId::new(id).ok())
}

/// Whether a serial is a fragment device's.
pub fn is_fragment_serial(serial: &str) -> bool {
    serial.starts_with(FRAGMENT_SERIAL_PREFIX)
}

/// Whether a serial is a broker mailbox device's.
pub fn is_broker_serial(serial: &str) -> bool {
    serial.starts_with(BROKER_SERIAL_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_cut_at_nul_and_made_printable() {
        assert_eq!(printable(b"ksf-vhd-1\0\0\0\0\0\0\0\0\0\0\0"), "ksf-vhd-1");
        assert_eq!(printable(b"ksf-vhd-1\n"), "ksf-vhd-1");
        assert_eq!(printable(b"12345678901234567890"), "12345678901234567890");
        assert_eq!(printable(b"ksf-\x1b[31m\xff"), "ksf-?[31m?");
        assert_eq!(printable(b""), "");
    }

    #[test]
    fn only_ksf_serials_name_a_holder() {
        assert_eq!(
            holder_id("ksf-vhd-2").map(String::from),
            Some("vhd-2".into())
        );
        assert_eq!(holder_id("vhost_user_blk"), None);
        assert_eq!(holder_id("ksf-"), None);
        assert_eq!(holder_id("ksf-NOT VALID"), None);
        assert!(is_fragment_serial("ksf-x"));
        assert!(!is_fragment_serial("ksb-vm1"));
        assert!(is_broker_serial("ksb-vm1"));
        assert!(!is_broker_serial("ksf-vhd-1"));
    }
}
