//! The upcase table: how names compare case-insensitively, one UTF-16 unit at a time, as NTFS compares them.
//!
//! NTFS upcases both names with the volume's `$UpCase` table (one entry per UTF-16 unit, a one-to-one mapping) and
//! compares the results unit by unit. Shunt uses a static table of the same shape:
//!
//! - **Source.** Unicode's uppercase mapping as Rust's `char::to_uppercase` reports it, kept only where the result is
//!   a single character in the Basic Multilingual Plane; every other unit (surrogates included) maps to itself. So
//!   `ä` → `Ä`, `ω` → `Ω`, while `ß` stays `ß` (its full uppercase is the two letters `SS`), and names never change
//!   length.
//! - **Version.** [`UNICODE_VERSION`], the Unicode version of the Rust toolchain that generated the checked-in table
//!   (`upcase_table.rs`). The test `table_matches_generator` regenerates the table from the running toolchain and
//!   fails when they differ; `SHUNT_REGENERATE_UPCASE=1 cargo test -p shunt-protocol upcase` rewrites the file.
//! - **Differences from NTFS.** A volume's `$UpCase` is written when it is formatted, from the tables of that Windows
//!   version (Windows 10/11 format with a table close to Unicode simple uppercase). Known differences: characters
//!   whose *full* uppercase expands to several characters but whose *simple* uppercase is one character (the Greek
//!   letters with ypogegrammeni, U+1F80–U+1FFC, e.g. `ᾀ` U+1F80, which simple uppercase maps to `ᾈ` U+1F88) are left
//!   unchanged here; and letters added to Unicode after the volume was formatted are upcased here but not by NTFS.
//!   Both kinds only matter for names containing those letters. A rule's literal text that contains them can miss a
//!   spelling that differs only in their case; `shuntctl policy check` does not yet warn about it.
//!
//! Comparisons never depend on a locale: the Turkish dotless `ı` upcases to `I` for every user, as in NTFS.

#[path = "upcase_table.rs"]
mod table;

pub use table::UNICODE_VERSION;

/// Upcases one UTF-16 unit with Shunt's upcase table.
#[must_use]
#[inline]
pub fn upcase(unit: u16) -> u16 {
    if unit < 0x80 {
        // ASCII dominates real paths; keep it off the table.
        return upcase_ascii(unit);
    }
    let [high, low] = unit.to_be_bytes();
    let block = table::INDEX.get(usize::from(high)).copied().unwrap_or(0);
    let delta = table::BLOCKS.get(usize::from(block)).and_then(|b| b.get(usize::from(low))).copied().unwrap_or(0);
    unit.wrapping_add(delta)
}

/// Upcases an ASCII unit without a branch (other units come out unchanged or wrong; callers check for ASCII).
#[inline]
pub(crate) fn upcase_ascii(unit: u16) -> u16 {
    let lower = u16::from(unit.wrapping_sub(0x61) < 26);
    unit.wrapping_sub(lower.wrapping_shl(5))
}

/// Compares two UTF-16 unit sequences the way NTFS compares names: equal length and equal after upcasing each unit.
#[must_use]
#[inline]
pub fn eq_ignore_case(a: &[u16], b: &[u16]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // A branch-free pass for ASCII, which vectorizes; the table only for names with other characters.
    let mut difference = 0u16;
    let mut wide = 0u16;
    for (&x, &y) in a.iter().zip(b) {
        difference |= upcase_ascii(x) ^ upcase_ascii(y);
        wide |= x | y;
    }
    if wide < 0x80 {
        return difference == 0;
    }
    a.iter().zip(b).all(|(&x, &y)| x == y || upcase(x) == upcase(y))
}

/// Compares two units either exactly (`case_sensitive`) or after upcasing both.
#[must_use]
#[inline]
pub(crate) fn unit_eq(a: u16, b: u16, case_sensitive: bool) -> bool {
    a == b || (!case_sensitive && upcase(a) == upcase(b))
}

/// Compares two names either exactly (`case_sensitive`) or as NTFS does.
#[must_use]
#[inline]
pub(crate) fn name_eq(a: &[u16], b: &[u16], case_sensitive: bool) -> bool {
    if case_sensitive { a == b } else { eq_ignore_case(a, b) }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "a panic in a test is a failed test"
)]
mod tests {
    extern crate std;

    use std::{fmt::Write as _, string::String, vec, vec::Vec};

    use super::*;

    /// The generator: one delta per unit from `char::to_uppercase`, kept where it is one BMP character.
    fn generate() -> (Vec<u8>, Vec<Vec<u16>>) {
        let deltas: Vec<u16> = (0..=u16::MAX)
            .map(|unit| {
                let upper = char::from_u32(u32::from(unit)).map_or(unit, |c| {
                    let mut it = c.to_uppercase();
                    match (it.next(), it.next()) {
                        (Some(x), None) => u16::try_from(u32::from(x)).unwrap_or(unit),
                        _ => unit,
                    }
                });
                upper.wrapping_sub(unit)
            })
            .collect();
        let mut index = vec![0u8; 256];
        let mut blocks = vec![vec![0u16; 256]];
        for (high, chunk) in deltas.chunks(256).enumerate() {
            if chunk.iter().any(|&d| d != 0) {
                index[high] = u8::try_from(blocks.len()).unwrap();
                blocks.push(chunk.to_vec());
            }
        }
        (index, blocks)
    }

    fn render(index: &[u8], blocks: &[Vec<u16>]) -> String {
        let (major, minor, update) = char::UNICODE_VERSION;
        let mut out = String::new();
        writeln!(out, "// @generated by `SHUNT_REGENERATE_UPCASE=1 cargo test -p shunt-protocol upcase`.").unwrap();
        writeln!(out, "// Simple one-to-one uppercase of every UTF-16 unit, from Rust's `char::to_uppercase`.")
            .unwrap();
        writeln!(out, "// INDEX maps a unit's high byte to a block; BLOCKS hold wrapping deltas per low byte.")
            .unwrap();
        writeln!(out).unwrap();
        writeln!(out, "/// The Unicode version the upcase table was generated from.").unwrap();
        writeln!(out, "pub const UNICODE_VERSION: (u8, u8, u8) = ({major}, {minor}, {update});").unwrap();
        writeln!(out).unwrap();
        writeln!(out, "#[rustfmt::skip]").unwrap();
        writeln!(out, "pub(super) static INDEX: [u8; 256] = [").unwrap();
        for row in index.chunks(16) {
            let cells: Vec<String> = row.iter().map(|b| std::format!("{b}")).collect();
            writeln!(out, "    {},", cells.join(", ")).unwrap();
        }
        writeln!(out, "];").unwrap();
        writeln!(out).unwrap();
        writeln!(out, "#[rustfmt::skip]").unwrap();
        writeln!(out, "pub(super) static BLOCKS: [[u16; 256]; {}] = [", blocks.len()).unwrap();
        for block in blocks {
            writeln!(out, "    [").unwrap();
            for row in block.chunks(16) {
                let cells: Vec<String> = row.iter().map(|d| std::format!("0x{d:04X}")).collect();
                writeln!(out, "        {},", cells.join(", ")).unwrap();
            }
            writeln!(out, "    ],").unwrap();
        }
        writeln!(out, "];").unwrap();
        out
    }

    #[test]
    fn table_matches_generator() {
        let (index, blocks) = generate();
        let rendered = render(&index, &blocks);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/upcase_table.rs");
        if std::env::var_os("SHUNT_REGENERATE_UPCASE").is_some() {
            std::fs::write(path, &rendered).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap();
        assert!(
            checked_in == rendered,
            "upcase_table.rs is stale for Unicode {:?}: regenerate it",
            char::UNICODE_VERSION
        );
        assert_eq!(UNICODE_VERSION, char::UNICODE_VERSION);
        // And the lookup code reads the table as the generator meant it.
        for unit in 0..=u16::MAX {
            let [high, low] = unit.to_be_bytes();
            let expected = unit.wrapping_add(blocks[usize::from(index[usize::from(high)])][usize::from(low)]);
            assert_eq!(upcase(unit), expected, "unit {unit:#06x}");
        }
    }

    #[test]
    fn ntfs_style_examples() {
        let utf16 = |s: &str| s.encode_utf16().collect::<Vec<u16>>();
        assert!(eq_ignore_case(&utf16("ä"), &utf16("Ä")));
        assert!(eq_ignore_case(&utf16("Straße"), &utf16("STRAßE")));
        assert!(!eq_ignore_case(&utf16("ß"), &utf16("SS")));
        assert!(!eq_ignore_case(&utf16("ß"), &utf16("S")));
        assert!(eq_ignore_case(&utf16("ωmega"), &utf16("ΩMEGA")));
        assert!(eq_ignore_case(&utf16("config.INI"), &utf16("CONFIG.ini")));
        assert!(!eq_ignore_case(&utf16("a"), &utf16("ab")));
        // Surrogates map to themselves, so a non-BMP name only equals itself.
        assert_eq!(upcase(0xD801), 0xD801);
        assert!(eq_ignore_case(&utf16("𐐨"), &utf16("𐐨")));
    }
}
