//! The AMD EPYC generations whose VCEKs keyshard accepts, and what differs between them: the
//! trust anchors, the TCB byte layout and the length of the VCEK's hwID.

use std::fmt;

/// A processor generation, named as AMD's KDS and the VCEK's productName extension name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Product {
    Milan,
    Genoa,
    Turin,
}

impl Product {
    pub const ALL: [Product; 3] = [Self::Milan, Self::Genoa, Self::Turin];

    /// From a VCEK productName such as `Milan-B0` (family, then an optional `-stepping`).
    pub fn from_product_name(name: &str) -> Option<Self> {
        let family = name.split_once('-').map_or(name, |(family, _)| family);
        Self::ALL.into_iter().find(|p| p.as_str() == family)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Milan => "Milan",
            Self::Genoa => "Genoa",
            Self::Turin => "Turin",
        }
    }

    /// Length of the VCEK hwID extension, and of the meaningful prefix of the report's CHIP_ID.
    pub fn hwid_len(self) -> usize {
        match self {
            Self::Milan | Self::Genoa => 64,
            Self::Turin => 8,
        }
    }

    /// Whether a report's CHIP_ID names the chip with this hwID: the hwID is the CHIP_ID's
    /// prefix (all of it before Turin) and the rest of the CHIP_ID is zero.
    pub fn chip_id_matches(self, hwid: &[u8], chip_id: &[u8; 64]) -> bool {
        if hwid.len() != self.hwid_len() {
            return false;
        }
        match chip_id.split_at_checked(hwid.len()) {
            Some((prefix, rest)) => prefix == hwid && rest.iter().all(|&b| b == 0),
            None => false,
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names_map_to_families() {
        assert_eq!(Product::from_product_name("Milan-B0"), Some(Product::Milan));
        assert_eq!(Product::from_product_name("Genoa-B1"), Some(Product::Genoa));
        assert_eq!(Product::from_product_name("Turin"), Some(Product::Turin));
        assert_eq!(Product::from_product_name("milan-B0"), None);
        assert_eq!(Product::from_product_name("Naples-B0"), None);
        assert_eq!(Product::from_product_name(""), None);
    }

    #[test]
    fn chip_id_is_the_hwid_then_zeros() {
        let hwid = [7u8; 64];
        assert!(Product::Milan.chip_id_matches(&hwid, &[7; 64]));
        assert!(!Product::Milan.chip_id_matches(&hwid, &[8; 64]));
        assert!(!Product::Milan.chip_id_matches(&hwid[..8], &[7; 64]));
        let mut turin_chip = [0u8; 64];
        turin_chip[..8].copy_from_slice(&[5; 8]);
        assert!(Product::Turin.chip_id_matches(&[5; 8], &turin_chip));
        turin_chip[63] = 1;
        assert!(!Product::Turin.chip_id_matches(&[5; 8], &turin_chip));
    }
}
