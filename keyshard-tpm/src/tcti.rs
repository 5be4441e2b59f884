//! Which TPM to talk to: the TCTI configuration string ("device:/dev/tpmrm0",
//! "swtpm:host=127.0.0.1,port=2321", "mssim:...", "tabrmd:...") from a flag or the environment.

/// Without a flag or environment variable: the kernel's resource-managed TPM device.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Environment variables consulted in order, as tpm2-tools and tss-esapi do.
pub const TCTI_ENV_VARS: [&str; 2] = ["TPM2TOOLS_TCTI", "TCTI"];

/// The TCTI to open: `flag` (a `--tcti` value), else `TPM2TOOLS_TCTI`, else `TCTI`, else
/// [`DEFAULT_TCTI`]. Empty values count as unset.
pub fn resolve_tcti(flag: Option<&str>) -> String {
    resolve_tcti_with(flag, |name| std::env::var(name).ok())
}

/// [`resolve_tcti`] with the environment given as a lookup function.
pub fn resolve_tcti_with(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> String {
    flag.map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            TCTI_ENV_VARS
                .iter()
                .filter_map(|name| env(name))
                .map(|v| v.trim().to_owned())
                .find(|v| !v.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_TCTI.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        let vars = vars.to_vec();
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn flag_wins_over_the_environment() {
        let e = env(&[("TPM2TOOLS_TCTI", "swtpm:port=1"), ("TCTI", "swtpm:port=2")]);
        assert_eq!(resolve_tcti_with(Some("mssim:port=3"), &e), "mssim:port=3");
    }

    #[test]
    fn tpm2tools_tcti_wins_over_tcti() {
        let e = env(&[("TPM2TOOLS_TCTI", "swtpm:port=1"), ("TCTI", "swtpm:port=2")]);
        assert_eq!(resolve_tcti_with(None, &e), "swtpm:port=1");
        let e = env(&[("TCTI", "swtpm:port=2")]);
        assert_eq!(resolve_tcti_with(None, &e), "swtpm:port=2");
    }

    #[test]
    fn empty_values_are_unset_and_the_default_is_the_resource_manager() {
        let e = env(&[("TPM2TOOLS_TCTI", ""), ("TCTI", "  ")]);
        assert_eq!(resolve_tcti_with(Some(""), &e), "device:/dev/tpmrm0");
        let e = env(&[("TPM2TOOLS_TCTI", " "), ("TCTI", "swtpm:port=2")]);
        assert_eq!(resolve_tcti_with(None, &e), "swtpm:port=2");
        assert_eq!(resolve_tcti_with(None, env(&[])), DEFAULT_TCTI);
    }
}
