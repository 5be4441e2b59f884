//! [`Tpm`]: one open TPM with keyshard's persistent storage root key and attestation key,
//! opened from a TCTI string. Opening identifies the TPM, flushes what earlier clients left
//! loaded, and finds (or, the first time, creates) both keys.

use std::fmt;
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::{KeyHandle, TpmHandle};
use tss_esapi::structures::CapabilityData;
use tss_esapi::tcti_ldr::TctiNameConf;

use crate::error::{Result, TpmError, command, describe};
use crate::{keys, tcti};
use keyshard_attest::tpm::quote::AkPublic;
use keyshard_attest::tpm::spec::{AK_HANDLE, SRK_HANDLE};

/// Where the TPM is and where keyshard keeps its keys in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI configuration, e.g. "device:/dev/tpmrm0" or "swtpm:host=127.0.0.1,port=2321".
    pub tcti: String,
    /// Persistent handle of the storage root key.
    pub srk_handle: u32,
    /// Persistent handle of the attestation key.
    pub ak_handle: u32,
}

impl TpmConfig {
    /// `tcti` with the default handles ([`SRK_HANDLE`], [`AK_HANDLE`]).
    pub fn new(tcti: impl Into<String>) -> Self {
        Self {
            tcti: tcti.into(),
            srk_handle: SRK_HANDLE,
            ak_handle: AK_HANDLE,
        }
    }

    /// From a `--tcti` flag, falling back to the environment (see [`tcti::resolve_tcti`]).
    pub fn from_flag(flag: Option<&str>) -> Self {
        Self::new(tcti::resolve_tcti(flag))
    }
}

/// Who made the TPM, as it says itself. Advisory: an emulator can claim any vendor; only an
/// EK certificate chain proves hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmInfo {
    /// TPM_PT_MANUFACTURER as text: "IBM" (swtpm), "INTC", "AMD", "IFX", "STM", "NTC", "MSFT"...
    pub manufacturer: String,
    /// TPM_PT_VENDOR_STRING_1..4 concatenated: "SW   TPM" for swtpm.
    pub vendor: String,
    /// TPM_PT_FIRMWARE_VERSION_1 and _2.
    pub firmware: (u32, u32),
    /// Whether this looks like swtpm/libtpms (manufacturer "IBM", vendor "SW TPM").
    pub software: bool,
}

/// "IBM SW   TPM, firmware 20191023.00163636 (software TPM)"
impl fmt::Display for TpmInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}, firmware {:08x}.{:08x}",
            self.manufacturer, self.vendor, self.firmware.0, self.firmware.1
        )?;
        if self.software {
            f.write_str(" (software TPM)")?;
        }
        Ok(())
    }
}

/// What opening did, for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startup {
    /// The storage root key was created now (first use of this TPM); false when reused.
    pub srk_created: bool,
    /// The attestation key was created now; false when reused.
    pub ak_created: bool,
    /// Transient objects left by earlier clients, flushed.
    pub flushed_objects: usize,
    /// Sessions left by earlier clients, flushed.
    pub flushed_sessions: usize,
}

/// An open TPM. Every method takes `&mut self`: the TPM runs one command at a time and an
/// ESAPI context must not be used from two threads at once. To share one between threads, use
/// [`crate::TpmService`].
///
/// Keep one `Tpm` per TPM: without a resource manager (swtpm, /dev/tpm0) all clients share the
/// TPM's 3 object and 3 session slots, and opening flushes whatever other clients loaded.
pub struct Tpm {
    pub(crate) ctx: Context,
    pub(crate) srk: KeyHandle,
    pub(crate) ak: KeyHandle,
    ak_public: AkPublic,
    info: TpmInfo,
    startup: Startup,
    tcti: String,
}

impl fmt::Debug for Tpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tpm")
            .field("tcti", &self.tcti)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// Opens the TPM at `tcti` with the default key handles.
    pub fn open(tcti: &str) -> Result<Self> {
        Self::open_with(&TpmConfig::new(tcti))
    }

    /// Opens the TPM, flushes leftovers, and gets or creates the storage root key and the
    /// attestation key at their persistent handles.
    pub fn open_with(config: &TpmConfig) -> Result<Self> {
        if config.srk_handle == config.ak_handle {
            return Err(TpmError::Config(format!(
                "the storage root key and the attestation key cannot share handle {:#010x}",
                config.srk_handle
            )));
        }
        let tcti = config.tcti.clone();
        let conf = TctiNameConf::from_str(&tcti).map_err(|e| TpmError::Tcti {
            tcti: tcti.clone(),
            reason: describe(&e),
        })?;
        let unreachable = |e: tss_esapi::Error| TpmError::Unreachable {
            tcti: tcti.clone(),
            detail: describe(&e),
        };
        let mut ctx = Context::new(conf).map_err(unreachable)?;
        // The first command tells whether anything answers at all.
        let info = identify(&mut ctx).map_err(unreachable)?;
        let (flushed_objects, flushed_sessions) = flush_leftovers(&mut ctx)?;
        let (srk, srk_created) = keys::storage_root_key(&mut ctx, config.srk_handle)?;
        let (ak, ak_created, ak_public) = keys::attestation_key(&mut ctx, config.ak_handle)?;
        log::debug!(
            "TPM at {tcti}: {info}; SRK {:#010x} {}, AK {:#010x} {}; flushed {flushed_objects} \
             objects and {flushed_sessions} sessions",
            config.srk_handle,
            if srk_created { "created" } else { "reused" },
            config.ak_handle,
            if ak_created { "created" } else { "reused" },
        );
        Ok(Self {
            ctx,
            srk,
            ak,
            ak_public,
            info,
            startup: Startup {
                srk_created,
                ak_created,
                flushed_objects,
                flushed_sessions,
            },
            tcti,
        })
    }

    pub fn info(&self) -> &TpmInfo {
        &self.info
    }

    pub fn startup(&self) -> &Startup {
        &self.startup
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// The attestation key's public half, to pin in the verifier.
    pub fn ak_public(&self) -> &AkPublic {
        &self.ak_public
    }
}

fn identify(ctx: &mut Context) -> std::result::Result<TpmInfo, tss_esapi::Error> {
    let mut get = |tag: PropertyTag| -> std::result::Result<u32, tss_esapi::Error> {
        Ok(ctx.get_tpm_property(tag)?.unwrap_or(0))
    };
    let manufacturer = ascii(get(PropertyTag::Manufacturer)?);
    let mut vendor = String::new();
    for tag in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        vendor.push_str(&ascii(get(tag)?));
    }
    let firmware = (
        get(PropertyTag::FirmwareVersion1)?,
        get(PropertyTag::FirmwareVersion2)?,
    );
    Ok(TpmInfo {
        software: looks_like_swtpm(&manufacturer, &vendor),
        manufacturer,
        vendor,
        firmware,
    })
}

/// A TPM property word as text: four big-endian ASCII bytes, NULs dropped.
fn ascii(word: u32) -> String {
    word.to_be_bytes()
        .iter()
        .filter(|b| **b != 0)
        .map(|b| char::from(*b))
        .collect()
}

/// swtpm (libtpms) reports manufacturer "IBM" and vendor strings "SW  " + " TPM".
fn looks_like_swtpm(manufacturer: &str, vendor: &str) -> bool {
    manufacturer.trim() == "IBM" && vendor.replace(' ', "").eq_ignore_ascii_case("SWTPM")
}

/// TPM handles in use from `first` on (GetCapability HANDLES) whose top byte passes `keep`.
pub(crate) fn handles_from(
    ctx: &mut Context,
    first: u32,
    keep: impl Fn(u8) -> bool,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut next = first;
    // A TPM holds a few dozen handles of a type at most; the bound only guards the loop.
    for _ in 0..64 {
        let (data, more) = ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, next, 64))
            .map_err(command("GetCapability"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::UnexpectedResponse {
                command: "GetCapability",
                what: "no handle list",
            });
        };
        let handles: Vec<u32> = list.iter().map(|h| u32::from(*h)).collect();
        out.extend(handles.iter().filter(|h| keep(h.to_be_bytes()[0])));
        match handles.last().and_then(|last| last.checked_add(1)) {
            Some(n) if more => next = n,
            _ => break,
        }
    }
    Ok(out)
}

/// Flushes transient objects and sessions left behind by clients that crashed or exited
/// without cleaning up; returns how many of each. Under /dev/tpmrm0 the kernel's resource
/// manager shows only this connection's own handles, so this finds nothing there.
fn flush_leftovers(ctx: &mut Context) -> Result<(usize, usize)> {
    let objects = handles_from(ctx, 0x8000_0000, |t| t == 0x80)?;
    // TPM_HT_LOADED_SESSION lists loaded sessions: 0x02.. HMAC, 0x03.. policy.
    let sessions = handles_from(ctx, 0x0200_0000, |t| matches!(t, 0x02 | 0x03))?;
    for &handle in objects.iter().chain(sessions.iter()) {
        let tpm_handle = TpmHandle::try_from(handle).map_err(command("FlushContext"))?;
        let esys = ctx
            .tr_from_tpm_public(tpm_handle)
            .map_err(command("ReadPublic"))?;
        match ctx.flush_context(esys) {
            // For a session obtained this way tss-esapi's own bookkeeping fails after the
            // TPM2_FlushContext itself succeeded.
            Ok(())
            | Err(tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::InvalidHandleState,
            )) => {}
            Err(e) => return Err(command("FlushContext")(e)),
        }
    }
    if !objects.is_empty() || !sessions.is_empty() {
        log::info!(
            "flushed {} transient objects and {} sessions left in the TPM by earlier clients",
            objects.len(),
            sessions.len()
        );
    }
    Ok((objects.len(), sessions.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_words_read_as_text() {
        assert_eq!(ascii(0x4942_4d00), "IBM");
        assert_eq!(ascii(0x5357_2020), "SW  ");
        assert_eq!(ascii(0x494e_5443), "INTC");
    }

    #[test]
    fn swtpm_is_recognised_and_hardware_is_not() {
        assert!(looks_like_swtpm("IBM", "SW   TPM"));
        assert!(!looks_like_swtpm("IBM", "")); // IBM also makes hardware
        assert!(!looks_like_swtpm("INTC", "Intel"));
        assert!(!looks_like_swtpm("MSFT", "SW   TPM"));
    }

    #[test]
    fn info_says_software_when_it_is() {
        let info = TpmInfo {
            manufacturer: "IBM".into(),
            vendor: "SW   TPM".into(),
            firmware: (0x2019_1023, 0x0016_3636),
            software: true,
        };
        assert_eq!(
            info.to_string(),
            "IBM SW   TPM, firmware 20191023.00163636 (software TPM)"
        );
    }

    #[test]
    fn a_tpm_can_move_to_another_thread_or_sit_in_a_mutex() {
        fn send<T: Send>() {}
        send::<Tpm>();
        send::<std::sync::Mutex<Tpm>>();
    }

    #[test]
    fn config_defaults_to_the_standard_handles() {
        let c = TpmConfig::new("swtpm:port=2321");
        assert_eq!((c.srk_handle, c.ak_handle), (0x8100_0001, 0x8100_0002));
    }

    #[test]
    fn a_bad_tcti_or_shared_handle_is_refused_before_any_tpm_access() {
        let err = Tpm::open("nosuchtcti:foo").unwrap_err();
        assert!(matches!(err, TpmError::Tcti { .. }), "{err}");
        let mut c = TpmConfig::new("swtpm:port=2321");
        c.ak_handle = c.srk_handle;
        assert!(matches!(Tpm::open_with(&c), Err(TpmError::Config(_))));
    }
}
