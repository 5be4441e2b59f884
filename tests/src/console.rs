//! A guest's serial console log, and the `KEYSHARD-E2E:` markers that `images/init.sh` prints
//! into it.

/// The prefix of every line the guest init prints for the tests.
pub const MARKER: &str = "KEYSHARD-E2E: ";

/// A console log with carriage returns and terminal escape sequences (SeaBIOS prints some)
/// removed.
#[derive(Debug, Clone, Default)]
pub struct Console {
    text: String,
}

impl Console {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            text: strip_escapes(&String::from_utf8_lossy(bytes)).replace('\r', ""),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The last `count` lines, for failure messages.
    pub fn tail(&self, count: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        let start = lines.len().saturating_sub(count);
        lines.get(start..).unwrap_or_default().join("\n")
    }

    /// The text after `KEYSHARD-E2E: ` of every marker line, in order.
    pub fn markers(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix(MARKER))
            .collect()
    }

    /// Whether a marker line reads exactly `KEYSHARD-E2E: <marker>`.
    pub fn has_marker(&self, marker: &str) -> bool {
        self.markers().contains(&marker)
    }

    /// The first marker starting with `prefix`.
    pub fn marker_starting_with(&self, prefix: &str) -> Option<&str> {
        self.markers().into_iter().find(|m| m.starts_with(prefix))
    }

    /// The lines between the markers `begin` and `end` (kernel log lines left out), or None
    /// unless both markers were printed in that order.
    pub fn between(&self, begin: &str, end: &str) -> Option<Vec<&str>> {
        let mut inside = None;
        for line in self.text.lines() {
            match (line.strip_prefix(MARKER), inside.as_mut()) {
                (Some(m), None) if m == begin => inside = Some(Vec::new()),
                (Some(m), Some(_)) if m == end => return inside,
                (_, Some(lines)) if !is_kernel_log(line) => lines.push(line),
                _ => {}
            }
        }
        None
    }

    /// The known file the guest printed after unlocking the volume.
    pub fn volume_file(&self) -> Option<String> {
        let begin = self.marker_starting_with("file ")?.to_owned();
        if !begin.ends_with(" begin") {
            return None;
        }
        self.between(&begin, "file end")
            .map(|lines| lines.join("\n"))
    }

    /// What `keyshard-guest` wrote on stderr in the guest.
    pub fn guest_stderr(&self) -> Option<String> {
        self.between("keyshard-guest stderr begin", "keyshard-guest stderr end")
            .map(|lines| lines.join("\n"))
    }

    /// The virtio-blk serials the guest found, as `device /dev/vdX serial=...` markers report.
    pub fn device_serials(&self) -> Vec<&str> {
        self.markers()
            .into_iter()
            .filter_map(|m| m.strip_prefix("device ")?.split_once(" serial="))
            .map(|(_, serial)| serial)
            .collect()
    }
}

/// A printk line as the console shows it: `[    3.123456] ...`.
fn is_kernel_log(line: &str) -> bool {
    line.strip_prefix('[').is_some_and(|rest| {
        rest.split_once(']').is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
    })
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final`, and two-byte `ESC x`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // ESC x is two characters; ESC [ runs to a final byte in @..=~
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNLOCKED: &str = "SeaBIOS (version 1.16.3)\r\n\x1b[2J\x1bcBooting from ROM..\r\n\
KEYSHARD-E2E: init started, kernel 6.1.0\r\n\
KEYSHARD-E2E: device /dev/vda serial=ks-volume\r\n\
KEYSHARD-E2E: device /dev/vdb serial=ksf-vhd-1\r\n\
KEYSHARD-E2E: keyshard-guest stderr begin\r\n\
keyshard-guest: info: 3 of 3 fragments\r\n\
KEYSHARD-E2E: keyshard-guest stderr end\r\n\
KEYSHARD-E2E: unlocked\r\n\
KEYSHARD-E2E: file keyshard-volume.txt begin\r\n\
first line\r\n\
[    3.123456] EXT4-fs (dm-0): mounted filesystem\r\n\
second line\r\n\
KEYSHARD-E2E: file end\r\n\
KEYSHARD-E2E: poweroff\r\n\
[    3.9] reboot: Power down\r\n";

    #[test]
    fn reads_the_markers_of_an_unlocked_boot() {
        let console = Console::from_bytes(UNLOCKED.as_bytes());
        assert!(console.has_marker("unlocked"));
        assert!(console.has_marker("poweroff"));
        assert!(!console.has_marker("locked"));
        assert_eq!(
            console.volume_file().as_deref(),
            Some("first line\nsecond line")
        );
        assert_eq!(
            console.guest_stderr().as_deref(),
            Some("keyshard-guest: info: 3 of 3 fragments")
        );
        assert_eq!(console.device_serials(), vec!["ks-volume", "ksf-vhd-1"]);
        assert!(console.text().contains("Booting from ROM"));
        assert!(!console.text().contains('\u{1b}') && !console.text().contains('\r'));
    }

    #[test]
    fn an_unfinished_section_is_none() {
        let console = Console::from_bytes(
            b"KEYSHARD-E2E: keyshard-guest stderr begin\nkeyshard-guest: reading\n",
        );
        assert_eq!(console.guest_stderr(), None);
        assert_eq!(console.volume_file(), None);
    }

    #[test]
    fn a_locked_boot_has_its_reason() {
        let console = Console::from_bytes(
            b"KEYSHARD-E2E: locked (keyshard-guest exit 2: quorum not met)\nKEYSHARD-E2E: poweroff\n",
        );
        assert_eq!(
            console.marker_starting_with("locked"),
            Some("locked (keyshard-guest exit 2: quorum not met)")
        );
        assert!(!console.has_marker("unlocked"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let console = Console::from_bytes(b"a\nb\nc\n");
        assert_eq!(console.tail(2), "b\nc");
        assert_eq!(console.tail(10), "a\nb\nc");
    }
}
