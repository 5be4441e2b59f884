//! TCB versions: the security patch levels (SPLs) a report's REPORTED_TCB and a VCEK carry, their
//! 8-byte layout per product, and the component-wise "at least" comparison.

use std::fmt;

use super::product::Product;

/// Security patch levels. `fmc` exists on Turin only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    pub fmc: Option<u8>,
}

impl Tcb {
    /// Decodes a TCB_VERSION. Milan and Genoa: `[bl, tee, 0, 0, 0, 0, snp, ucode]`;
    /// Turin: `[fmc, bl, tee, snp, 0, 0, 0, ucode]`. Reserved bytes are signed but carry no level.
    pub fn from_bytes(product: Product, raw: [u8; 8]) -> Self {
        let [b0, b1, b2, b3, _, _, b6, b7] = raw;
        match product {
            Product::Milan | Product::Genoa => Self {
                bootloader: b0,
                tee: b1,
                snp: b6,
                microcode: b7,
                fmc: None,
            },
            Product::Turin => Self {
                bootloader: b1,
                tee: b2,
                snp: b3,
                microcode: b7,
                fmc: Some(b0),
            },
        }
    }

    /// The TCB_VERSION bytes for `product` (reserved bytes zero; `fmc` ignored before Turin).
    pub fn to_bytes(&self, product: Product) -> [u8; 8] {
        match product {
            Product::Milan | Product::Genoa => [
                self.bootloader,
                self.tee,
                0,
                0,
                0,
                0,
                self.snp,
                self.microcode,
            ],
            Product::Turin => [
                self.fmc.unwrap_or(0),
                self.bootloader,
                self.tee,
                self.snp,
                0,
                0,
                0,
                self.microcode,
            ],
        }
    }

    /// Every component at least the minimum's. A minimum `fmc` requires an `fmc` here.
    pub fn meets(&self, minimum: &Tcb) -> bool {
        let fmc_ok = match (self.fmc, minimum.fmc) {
            (_, None) => true,
            (Some(have), Some(want)) => have >= want,
            (None, Some(_)) => false,
        };
        self.bootloader >= minimum.bootloader
            && self.tee >= minimum.tee
            && self.snp >= minimum.snp
            && self.microcode >= minimum.microcode
            && fmc_ok
    }
}

impl fmt::Display for Tcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bootloader {}, tee {}, snp {}, microcode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )?;
        match self.fmc {
            Some(fmc) => write!(f, ", fmc {fmc}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCB: Tcb = Tcb {
        bootloader: 3,
        tee: 0,
        snp: 8,
        microcode: 115,
        fmc: None,
    };

    #[test]
    fn milan_layout_round_trips() {
        let raw = [3, 0, 0, 0, 0, 0, 8, 0x73];
        assert_eq!(Tcb::from_bytes(Product::Milan, raw), TCB);
        assert_eq!(TCB.to_bytes(Product::Milan), raw);
        assert_eq!(Tcb::from_bytes(Product::Genoa, raw), TCB);
    }

    #[test]
    fn turin_layout_round_trips() {
        let turin = Tcb {
            fmc: Some(1),
            ..TCB
        };
        let raw = [1, 3, 0, 8, 0, 0, 0, 0x73];
        assert_eq!(Tcb::from_bytes(Product::Turin, raw), turin);
        assert_eq!(turin.to_bytes(Product::Turin), raw);
    }

    #[test]
    fn meets_compares_each_component() {
        assert!(TCB.meets(&TCB));
        assert!(TCB.meets(&Tcb::default()));
        // A higher microcode does not make up for a lower snp level (no u64 comparison).
        let min = Tcb {
            snp: 9,
            microcode: 1,
            ..TCB
        };
        assert!(!TCB.meets(&min));
        assert!(!TCB.meets(&Tcb {
            bootloader: 4,
            ..TCB
        }));
        assert!(!TCB.meets(&Tcb {
            fmc: Some(0),
            ..TCB
        }));
        let turin = Tcb {
            fmc: Some(2),
            ..TCB
        };
        assert!(turin.meets(&Tcb {
            fmc: Some(2),
            ..TCB
        }));
        assert!(!turin.meets(&Tcb {
            fmc: Some(3),
            ..TCB
        }));
    }
}
