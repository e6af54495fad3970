//! Names as NTFS compares, validates and shortens them: the upcase comparison, path parsing with stream suffixes,
//! and 8.3 short-name generation.

use windows_sys::Win32::Foundation::{NTSTATUS, STATUS_OBJECT_NAME_INVALID};

/// The longest name component NTFS stores, in UTF-16 units.
const MAX_COMPONENT: usize = 255;

/// Upcases one UTF-16 unit the way an NTFS `$UpCase` table does: every unit maps to exactly one unit, so a
/// character whose uppercase form is longer (`ß` → `SS`) or lies outside the BMP keeps its case, and
/// supplementary-plane characters (surrogate pairs) are never upcased.
fn upcase_char(c: char) -> char {
    if u32::from(c) > 0xFFFF {
        return c;
    }
    let mut upper = c.to_uppercase();
    match (upper.next(), upper.next()) {
        (Some(u), None) if u32::from(u) <= 0xFFFF => u,
        _ => c,
    }
}

/// The upcased form of `name` under which NTFS compares names case-insensitively.
pub(super) fn upcase(name: &str) -> String {
    name.chars().map(upcase_char).collect()
}

/// Whether two names are the same name: case-insensitively by the upcase table, or exactly when `case_sensitive`.
pub(super) fn same(a: &str, b: &str, case_sensitive: bool) -> bool {
    if case_sensitive { a == b } else { a == b || upcase(a) == upcase(b) }
}

/// Checks one component (file or stream name) against the NTFS rules: not empty, not `.`/`..`, at most 255 UTF-16
/// units, no control characters and none of `"*/:<>?\|`
/// (<https://learn.microsoft.com/windows/win32/fileio/naming-a-file>; MS-FSCC 2.1.5). Trailing dots and spaces are
/// legal at the NT layer: only Win32 path normalisation strips them, so the model keeps them as given.
pub(super) fn check_component(name: &str) -> Result<(), NTSTATUS> {
    let invalid = |c: char| c < ' ' || matches!(c, '"' | '*' | '/' | ':' | '<' | '>' | '?' | '\\' | '|');
    if name.is_empty() || name == "." || name == ".." || name.encode_utf16().count() > MAX_COMPONENT {
        return Err(STATUS_OBJECT_NAME_INVALID);
    }
    if name.chars().any(invalid) { Err(STATUS_OBJECT_NAME_INVALID) } else { Ok(()) }
}

/// Which stream of a file a name designates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum StreamSpec {
    /// No stream suffix: the default data stream of a file, or the directory itself.
    Unnamed,
    /// `name::$DATA`: the default data stream, explicitly (never a directory).
    DefaultData,
    /// `name:stream` or `name:stream:$DATA`.
    Named(String),
}

/// A parsed path within a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ParsedPath {
    /// The directory components and, last, the file's name (empty for the root).
    pub components: Vec<String>,
    /// The stream the last component names.
    pub stream: StreamSpec,
    /// The path ended in a backslash, which only a directory may have.
    pub trailing_backslash: bool,
}

/// Parses `\dir\file[:stream[:$DATA]]` (MS-FSA 2.1.5.1: the stream name and type follow the last component;
/// `$DATA` is the only stream type the model knows, so `$INDEX_ALLOCATION` and other types are refused with
/// `STATUS_OBJECT_NAME_INVALID`, stricter than NTFS for `dir:$I30:$INDEX_ALLOCATION`).
pub(super) fn parse(path: &str) -> Result<ParsedPath, NTSTATUS> {
    let rest = path.strip_prefix('\\').ok_or(STATUS_OBJECT_NAME_INVALID)?;
    if rest.is_empty() {
        return Ok(ParsedPath { components: Vec::new(), stream: StreamSpec::Unnamed, trailing_backslash: false });
    }
    let (rest, trailing_backslash) = rest.strip_suffix('\\').map_or((rest, false), |r| (r, true));
    let mut components: Vec<String> = rest.split('\\').map(str::to_owned).collect();
    let last = components.pop().ok_or(STATUS_OBJECT_NAME_INVALID)?;
    for component in &components {
        check_component(component)?;
    }
    let mut parts = last.split(':');
    let name = parts.next().unwrap_or_default().to_owned();
    check_component(&name)?;
    let stream = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => StreamSpec::Unnamed,
        (Some(""), Some(kind), None) if kind.eq_ignore_ascii_case("$DATA") => StreamSpec::DefaultData,
        (Some(stream), None, None) => named(stream)?,
        (Some(stream), Some(kind), None) if kind.eq_ignore_ascii_case("$DATA") => named(stream)?,
        _ => return Err(STATUS_OBJECT_NAME_INVALID),
    };
    if trailing_backslash && stream != StreamSpec::Unnamed {
        return Err(STATUS_OBJECT_NAME_INVALID);
    }
    components.push(name);
    Ok(ParsedPath { components, stream, trailing_backslash })
}

fn named(stream: &str) -> Result<StreamSpec, NTSTATUS> {
    check_component(stream)?;
    Ok(StreamSpec::Named(stream.to_owned()))
}

/// Characters an 8.3 name may hold besides letters and digits (FAT's short-name character set).
const SHORT_SPECIALS: &str = "$%'-_@~`!(){}^#&";

fn short_char_ok(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || SHORT_SPECIALS.contains(c)
}

/// Whether `name` is already a legal 8.3 name (compared upcased, so `readme.txt` is one): such names get no
/// separate short name, as on NTFS.
pub(super) fn is_8dot3(name: &str) -> bool {
    let upper = upcase(name);
    let (base, ext) = upper.split_once('.').unwrap_or((&upper, ""));
    let ok = |s: &str| s.chars().all(short_char_ok);
    (1..=8).contains(&base.len())
        && ext.len() <= 3
        && !ext.contains('.')
        && !(upper.ends_with('.'))
        && ok(base)
        && ok(ext)
}

/// A 16-bit hash of the long name for the hashed short-name form (FNV-1a over the UTF-16 units; NTFS uses its own
/// checksum, which nothing may rely on).
fn name_hash(name: &str) -> u16 {
    let mut hash: u32 = 0x811C_9DC5;
    for unit in name.encode_utf16() {
        hash ^= u32::from(unit);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u16::try_from((hash >> 16) ^ (hash & 0xFFFF)).unwrap_or(0)
}

/// Generates the 8.3 short name for `long` that `taken` does not report as used in the directory, in the manner
/// of `RtlGenerate8dot3Name`: upcase, drop spaces and leading dots, replace characters outside the 8.3 set with
/// `_`, keep at most three extension characters after the last dot, then `BASE~N` with the first six base
/// characters for N = 1..=4 and `BAxxxx~N` (two characters and a hash of the long name) after that.
/// (<https://learn.microsoft.com/windows/win32/fileio/naming-a-file#short-vs-long-names>)
pub(super) fn generate_short(long: &str, taken: impl Fn(&str) -> bool) -> String {
    let cleaned: String = upcase(long)
        .trim_start_matches('.')
        .chars()
        .filter(|c| *c != ' ')
        .map(|c| if c == '.' || short_char_ok(c) { c } else { '_' })
        .collect();
    let (base, ext) = match cleaned.rsplit_once('.') {
        Some((base, ext)) => (base.replace('.', ""), ext.chars().take(3).collect::<String>()),
        None => (cleaned.clone(), String::new()),
    };
    let base = if base.is_empty() { "_".to_owned() } else { base };
    let with_ext = |stem: String| if ext.is_empty() { stem } else { format!("{stem}.{ext}") };
    for n in 1..=4u32 {
        let candidate = with_ext(format!("{}~{n}", base.chars().take(6).collect::<String>()));
        if !taken(&candidate) {
            return candidate;
        }
    }
    let hashed = format!("{}{:04X}", base.chars().take(2).collect::<String>(), name_hash(long));
    let mut n: u32 = 1;
    loop {
        let digits = n.to_string();
        let keep = 7usize.saturating_sub(digits.len());
        let candidate = with_ext(format!("{}~{digits}", hashed.chars().take(keep).collect::<String>()));
        if !taken(&candidate) || n == u32::MAX {
            return candidate;
        }
        n = n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upcase_maps_one_unit_to_one_unit() {
        assert!(same("straße", "STRAßE", false));
        assert!(!same("straße", "STRASSE", false));
        assert!(same("ä", "Ä", false));
        assert!(!same("ä", "Ä", true));
        assert!(same("ǆ", "Ǆ", false));
        // Supplementary-plane letters keep their case: NTFS upcases UTF-16 units, not code points.
        assert!(!same("\u{10428}", "\u{10400}", false));
    }

    #[test]
    fn components_are_validated() {
        for bad in ["a<b", "a>b", "a\"b", "a|b", "a?b", "a*b", "a/b", "a\u{1}b", ".", ".."] {
            assert_eq!(check_component(bad), Err(STATUS_OBJECT_NAME_INVALID), "{bad:?}");
        }
        assert_eq!(check_component(&"x".repeat(256)), Err(STATUS_OBJECT_NAME_INVALID));
        assert_eq!(check_component(&"x".repeat(255)), Ok(()));
        assert_eq!(check_component("trailing. "), Ok(()));
    }

    #[test]
    fn paths_parse_streams_and_trailing_backslashes() {
        let p = parse(r"\dir\file.txt:meta:$DATA").unwrap();
        assert_eq!(p.components, ["dir", "file.txt"]);
        assert_eq!(p.stream, StreamSpec::Named("meta".into()));
        assert_eq!(parse(r"\f::$DATA").unwrap().stream, StreamSpec::DefaultData);
        assert_eq!(parse(r"\f::$data").unwrap().stream, StreamSpec::DefaultData);
        assert_eq!(parse(r"\f:s").unwrap().stream, StreamSpec::Named("s".into()));
        assert!(parse(r"\dir\").unwrap().trailing_backslash);
        assert_eq!(parse(r"\").unwrap().components, Vec::<String>::new());
        for bad in [r"\f:", r"\f:s:", r"\f:s:$INDEX_ALLOCATION", r"\f:a:b:c", r"\a\\b", r"\a:b\c", "rel", r"\f:s\"] {
            assert_eq!(parse(bad), Err(STATUS_OBJECT_NAME_INVALID), "{bad:?}");
        }
    }

    #[test]
    fn short_names_follow_the_8dot3_pattern() {
        assert!(is_8dot3("README.TXT"));
        assert!(is_8dot3("readme.txt"));
        assert!(!is_8dot3("long file.txt"));
        assert!(!is_8dot3("LONGFILENAME.TXT"));
        assert!(!is_8dot3("a.b.c"));
        assert_eq!(generate_short("LongFileName.txt", |_| false), "LONGFI~1.TXT");
        assert_eq!(generate_short("a b+c.html", |_| false), "AB_C~1.HTM");
        assert_eq!(generate_short(".htaccess", |_| false), "HTACCE~1");
        assert_eq!(generate_short("x.y.tar.gz", |_| false), "XYTAR~1.GZ");
        let taken = ["LONGFI~1.TXT", "LONGFI~2.TXT", "LONGFI~3.TXT", "LONGFI~4.TXT"];
        let fifth = generate_short("LongFileName.txt", |c| taken.contains(&c));
        assert!(fifth.starts_with("LO") && fifth.ends_with("~1.TXT") && fifth.len() == 12, "{fifth}");
        assert!(is_8dot3(&fifth));
    }
}
