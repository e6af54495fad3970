//! NT names as Shunt reads them: volumes, path components, stream suffixes and the characters a rule may contain.

use core::fmt;

use crate::upcase::eq_ignore_case;

/// The path separator of NT names.
pub const SEPARATOR: u16 = b'\\' as u16;
pub(crate) const COLON: u16 = b':' as u16;
pub(crate) const DOT: u16 = b'.' as u16;
pub(crate) const SPACE: u16 = b' ' as u16;
pub(crate) const STAR: u16 = b'*' as u16;
pub(crate) const QUESTION: u16 = b'?' as u16;
pub(crate) const TILDE: u16 = b'~' as u16;

/// The suffix that names a file's default data stream: `file.ini::$DATA` is `file.ini`.
const DEFAULT_STREAM: [u16; 7] = units(*b"::$DATA");

/// Widens ASCII bytes to UTF-16 units at compile time.
#[expect(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "only evaluated in constants, where an out-of-bounds index is a compile error, not a panic"
)]
pub(crate) const fn units<const N: usize>(ascii: [u8; N]) -> [u16; N] {
    let mut out = [0u16; N];
    let mut i = 0;
    while i < N {
        // CAST: u8 to u16 is lossless; `From` is not callable in a const fn.
        out[i] = ascii[i] as u16;
        i += 1;
    }
    out
}

/// A volume GUID, in the byte order Windows keeps a `GUID` in memory (`Data1`–`Data3` little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the 38 units `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (hex digits in either case).
    #[must_use]
    pub fn parse(text: &[u16]) -> Option<Self> {
        let inner = text.strip_prefix(&[u16::from(b'{')])?.strip_suffix(&[u16::from(b'}')])?;
        if inner.len() != 36 {
            return None;
        }
        // The textual form is Data1, Data2, Data3 big-endian, then the eight bytes of Data4 in order.
        let mut text_order = [0u8; 16];
        let mut nibbles = inner.iter().enumerate().filter(|&(position, _)| !matches!(position, 8 | 13 | 18 | 23));
        if inner.iter().enumerate().any(|(position, &unit)| matches!(position, 8 | 13 | 18 | 23) && unit != 0x2D) {
            return None;
        }
        for byte in &mut text_order {
            let high = hex_digit(*nibbles.next()?.1)?;
            let low = hex_digit(*nibbles.next()?.1)?;
            *byte = (high << 4) | low;
        }
        let [a0, a1, a2, a3, b0, b1, c0, c1, rest @ ..] = text_order;
        let [r0, r1, r2, r3, r4, r5, r6, r7] = rest;
        Some(Self([a3, a2, a1, a0, b1, b0, c1, c0, r0, r1, r2, r3, r4, r5, r6, r7]))
    }
}

fn hex_digit(unit: u16) -> Option<u8> {
    let digit = char::from_u32(u32::from(unit))?.to_digit(16)?;
    u8::try_from(digit).ok()
}

impl fmt::Display for Guid {
    /// Writes `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` in lower case, as `mountvol` shows volume GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a0, a1, a2, a3, b0, b1, c0, c1, r0, r1, r2, r3, r4, r5, r6, r7] = self.0;
        let data1 = u32::from_le_bytes([a0, a1, a2, a3]);
        let data2 = u16::from_le_bytes([b0, b1]);
        let data3 = u16::from_le_bytes([c0, c1]);
        write!(f, "{{{data1:08x}-{data2:04x}-{data3:04x}-{r0:02x}{r1:02x}-")?;
        write!(f, "{r2:02x}{r3:02x}{r4:02x}{r5:02x}{r6:02x}{r7:02x}}}")
    }
}

/// A volume as a policy names it.
///
/// The driver and the wire format only know [`Volume::Guid`]; drive letters exist so that `shuntctl` can check and
/// test a policy on any host, and are replaced by GUIDs before a policy is compiled for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Volume {
    /// A drive letter, upper case ASCII (`b'C'`).
    Letter(u8),
    /// A volume GUID (`\\?\Volume{GUID}\`).
    Guid(Guid),
}

impl fmt::Display for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Letter(letter) => write!(f, "{}:", char::from(*letter)),
            Self::Guid(guid) => write!(f, "\\\\?\\Volume{guid}"),
        }
    }
}

const VOLUME_PREFIX: [u16; 10] = units(*b"\\\\?\\Volume");

/// Splits a full path into its volume and the path within the volume, which keeps its leading `\`.
///
/// Accepts `X:\...` and `\\?\Volume{GUID}\...` (the word `Volume` in any case). Returns `None` for anything else:
/// relative paths, `X:` without a separator, UNC paths and device paths.
#[must_use]
pub fn split_volume(path: &[u16]) -> Option<(Volume, &[u16])> {
    if let [letter, COLON, rest @ ..] = path {
        let letter = u8::try_from(*letter).ok().filter(u8::is_ascii_alphabetic)?;
        return rest
            .first()
            .is_some_and(|&u| u == SEPARATOR)
            .then_some((Volume::Letter(letter.to_ascii_uppercase()), rest));
    }
    let head = path.get(..VOLUME_PREFIX.len())?;
    if !eq_ignore_case(head, &VOLUME_PREFIX) {
        return None;
    }
    let guid_text = path.get(VOLUME_PREFIX.len()..VOLUME_PREFIX.len().checked_add(38)?)?;
    let rest = path.get(VOLUME_PREFIX.len().checked_add(38)?..)?;
    let guid = Guid::parse(guid_text)?;
    rest.first().is_some_and(|&u| u == SEPARATOR).then_some((Volume::Guid(guid), rest))
}

/// The non-empty components of a path within a volume, as `(start, end)` unit offsets.
///
/// Repeated separators and leading or trailing separators produce no component.
#[derive(Clone, Debug)]
pub(crate) struct Components<'a> {
    path: &'a [u16],
    position: usize,
}

impl<'a> Components<'a> {
    pub(crate) fn new(path: &'a [u16]) -> Self {
        Self { path, position: 0 }
    }
}

impl<'a> Iterator for Components<'a> {
    type Item = (usize, &'a [u16]);

    /// Yields the start offset and the text of the next component.
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.path.get(self.position..)?;
        let skip = rest.iter().take_while(|&&u| u == SEPARATOR).count();
        let start = self.position.checked_add(skip)?;
        let tail = self.path.get(start..)?;
        if tail.is_empty() {
            self.position = self.path.len();
            return None;
        }
        let length = tail.iter().take_while(|&&u| u != SEPARATOR).count();
        self.position = start.checked_add(length)?;
        Some((start, tail.get(..length)?))
    }
}

/// The default-stream suffix check: `::$DATA` in any case.
pub(crate) fn is_default_stream(stream: &[u16]) -> bool {
    eq_ignore_case(stream, &DEFAULT_STREAM)
}

/// Whether a component is `.` or `..`.
pub(crate) fn is_dot_component(component: &[u16]) -> bool {
    matches!(component, [DOT] | [DOT, DOT])
}

/// Whether a component could be an 8.3 short name that NTFS generated (it contains `~`).
#[must_use]
pub fn may_be_short_name(component: &[u16]) -> bool {
    component.contains(&TILDE)
}

/// What is wrong with one component of a rule's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ComponentFault {
    Dots,
    TrailingDotOrSpace,
    Invalid(u16),
    Wildcard,
    Stream,
}

/// The units below 0x40 that a component may not hold or that need a closer look: controls, `"`, `*`, `/`, `:`,
/// `<`, `>` and `?` (bit `u` stands for unit `u`). The other one, `|`, is tested apart.
const SPECIAL_BELOW_40: u64 =
    0xFFFF_FFFF | 1 << 0x22 | 1 << 0x2A | 1 << 0x2F | 1 << 0x3A | 1 << 0x3C | 1 << 0x3E | 1 << 0x3F;

/// Whether `text` holds a unit that [`check_component`] rejects or that is a wildcard: one branch-free pass, so
/// that the usual component (letters, digits, spaces, dots) needs no other.
pub(crate) fn has_special_units(text: &[u16]) -> bool {
    let special = text.iter().fold(0u64, |special, &unit| {
        // Bit `unit` of the table when `unit` is below 0x40 (a shift by 0x40 or more is taken modulo 64, so it is
        // masked with the comparison rather than left to a branch).
        let below_40 = SPECIAL_BELOW_40.wrapping_shr(u32::from(unit)) & u64::from(unit < 0x40);
        special | below_40 | u64::from(unit == 0x7C)
    });
    special != 0
}

/// Checks one component of a rule's path against what NTFS accepts in a name, allowing `*` and `?` if `wildcards`.
pub(crate) fn check_component(component: &[u16], wildcards: bool) -> Result<(), ComponentFault> {
    if is_dot_component(component) {
        return Err(ComponentFault::Dots);
    }
    if !has_special_units(component) {
        // Only the last unit is left to check.
        return match component.last() {
            Some(&DOT | &SPACE) => Err(ComponentFault::TrailingDotOrSpace),
            _ => Ok(()),
        };
    }
    if let Some(&unit) = component.iter().find(|&&u| u < 0x20 || matches!(u, 0x22 | 0x2F | 0x3C | 0x3E | 0x7C)) {
        return Err(ComponentFault::Invalid(unit));
    }
    if component.contains(&COLON) {
        return Err(ComponentFault::Stream);
    }
    if !wildcards && component.iter().any(|&u| u == STAR || u == QUESTION) {
        return Err(ComponentFault::Wildcard);
    }
    if matches!(component.last(), Some(&DOT | &SPACE)) {
        return Err(ComponentFault::TrailingDotOrSpace);
    }
    Ok(())
}

/// Whether `text` is well-formed UTF-16 (every surrogate paired).
#[must_use]
pub fn is_valid_utf16(text: &[u16]) -> bool {
    // Surrogates are rare in names: one branch-free pass rules them out.
    let surrogates = text.iter().fold(0u16, |any, &unit| any | u16::from(unit & 0xF800 == 0xD800));
    surrogates == 0 || char::decode_utf16(text.iter().copied()).all(|c| c.is_ok())
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
    use std::{string::ToString, vec::Vec};

    use super::*;

    fn w(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    #[test]
    fn guid_round_trips_through_text() {
        let text = "{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}";
        let guid = Guid::parse(&w(text)).unwrap();
        assert_eq!(
            guid.0,
            [0x3d, 0x2c, 0x1b, 0x0a, 0x5f, 0x4e, 0x71, 0x60, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7, 0xe8, 0xf9]
        );
        assert_eq!(guid.to_string(), text);
        assert_eq!(Guid::parse(&w(&text.to_uppercase())), Some(guid));
        assert_eq!(Guid::parse(&w("{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f}")), None);
        assert_eq!(Guid::parse(&w("{0a1b2c3d+4e5f-6071-8293-a4b5c6d7e8f9}")), None);
        assert_eq!(Guid::parse(&w("{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8fg}")), None);
    }

    #[test]
    fn volumes_split_off_paths() {
        let path = w(r"c:\Apps\x");
        let (volume, rest) = split_volume(&path).unwrap();
        assert_eq!(volume, Volume::Letter(b'C'));
        assert_eq!(rest, w(r"\Apps\x"));
        let path = w(r"\\?\volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\A");
        let (volume, rest) = split_volume(&path).unwrap();
        assert!(matches!(volume, Volume::Guid(_)));
        assert_eq!(rest, w(r"\A"));
        for bad in [r"Apps\x", r"C:Apps", r"\Apps", r"\\server\share\x", r"1:\x", r"\\?\Volume{0a1b2c3d}\x", "C:"] {
            assert_eq!(split_volume(&w(bad)), None, "{bad}");
        }
    }

    #[test]
    fn components_skip_empty_ones() {
        let path = w(r"\\a\\bc\d\");
        let parts: Vec<(usize, Vec<u16>)> = Components::new(&path).map(|(s, c)| (s, c.to_vec())).collect();
        assert_eq!(parts, [(2, w("a")), (5, w("bc")), (8, w("d"))]);
        assert_eq!(Components::new(&w(r"\")).count(), 0);
    }

    #[test]
    fn component_checks() {
        assert_eq!(check_component(&w(".."), true), Err(ComponentFault::Dots));
        assert_eq!(check_component(&w("a."), true), Err(ComponentFault::TrailingDotOrSpace));
        assert_eq!(check_component(&w("a "), true), Err(ComponentFault::TrailingDotOrSpace));
        assert_eq!(check_component(&w("a:b"), true), Err(ComponentFault::Stream));
        assert_eq!(check_component(&w("a|b"), true), Err(ComponentFault::Invalid(0x7C)));
        assert_eq!(check_component(&w("*.log"), false), Err(ComponentFault::Wildcard));
        assert_eq!(check_component(&w("*.log"), true), Ok(()));
        assert!(is_default_stream(&w("::$data")));
        assert!(!is_valid_utf16(&[0xD800]));
        assert!(is_valid_utf16(&w("𐐨")));
    }
}
