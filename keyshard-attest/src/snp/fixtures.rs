//! The real Milan evidence in `tests/data/snp/`, for unit tests.

pub fn milan_report_bytes() -> Vec<u8> {
    let text = include_str!("../../tests/data/snp/report_milan.hex");
    hex::decode(text.trim()).unwrap()
}

pub const MILAN_VCEK_DER: &[u8] = include_bytes!("../../tests/data/snp/vcek_milan.der");
