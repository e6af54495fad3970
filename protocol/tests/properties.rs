//! Property tests: the compiled matcher agrees with the reference matcher, the codec round-trips, and no input
//! makes either panic.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    missing_docs,
    reason = "a panic in a test is a failed test"
)]

use proptest::{collection::vec, option, prelude::*};
use shunt_protocol::{
    Access, CompiledPolicy, Method, RuleSpec, Volume, VolumeNames, reference,
    wire::{self, Request},
};

fn w(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

/// Components from a small alphabet, so generated paths often meet generated rules; mixed case and non-ASCII
/// letters exercise the upcase table (`ä`/`Ä` equal, `ß`/`SS` not).
const LITERALS: &[&str] = &["a", "A", "b", "ä", "Ä", "ß", "SS", "x.log", "X.LOG", "y.txt", "a.b.log", "~1"];
const GLOBS: &[&str] = &["*", "?", "*.log", "*.LOG", "x*", "*b*", "?.txt"];
const SUFFIXES: &[&str] = &["*.log", "*.LOG", "*.txt", "*.b.log"];

fn literal() -> impl Strategy<Value = String> {
    prop::sample::select(LITERALS).prop_map(str::to_owned)
}

fn source_pattern() -> impl Strategy<Value = String> {
    let prefix = vec(literal(), 1..4);
    (prefix, 0u8..6, prop::sample::select(GLOBS), prop::sample::select(SUFFIXES), vec(literal(), 0..2)).prop_map(
        |(prefix, kind, glob, suffix, tail)| {
            let prefix = prefix.join("\\");
            match kind {
                0 | 1 => format!(r"C:\{prefix}"),
                2 => format!(r"C:\{prefix}\**"),
                3 => format!(r"C:\{prefix}\**\{suffix}"),
                4 => format!(
                    r"C:\{prefix}\{glob}{}",
                    tail.iter().map(|t| ["\\", t.as_str()].concat()).collect::<String>()
                ),
                _ => format!(r"C:\{prefix}\**\{glob}"),
            }
        },
    )
}

fn rules() -> impl Strategy<Value = Vec<RuleSpec>> {
    vec((source_pattern(), option::of(prop::sample::select(&["a.exe", "B.EXE", r"C:\Tools\t.exe"][..]))), 0..24)
        .prop_map(|rules| {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (source, process))| RuleSpec {
                    name: w(&format!("rule-{i}")),
                    source: w(&source),
                    // Targets live on a volume without sources, so no generated policy has a cycle.
                    target: w(&format!(r"Z:\t{i}")),
                    method: Method::Forward,
                    access: Access::ReadOnly,
                    process: process.map(w),
                })
                .collect()
        })
}

fn path() -> impl Strategy<Value = String> {
    let separator = prop::sample::select(&["\\", "\\", "\\", "\\\\"][..]);
    let stream = prop::sample::select(&["", "", "", "::$DATA", "::$data", ":s", ":s:$DATA"][..]);
    (vec((separator, literal()), 0..6), stream, any::<bool>()).prop_map(|(parts, stream, trailing)| {
        let mut out: String = parts.iter().map(|(sep, part)| [*sep, part.as_str()].concat()).collect();
        out.push_str(stream);
        if trailing {
            out.push('\\');
        }
        out
    })
}

fn image() -> impl Strategy<Value = Option<String>> {
    option::of(
        prop::sample::select(&["a.exe", "A.EXE", r"C:\Tools\T.EXE", r"D:\Tools\t.exe", "b.exe"][..])
            .prop_map(str::to_owned),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The compiled matcher returns exactly what the reference returns: same rule, same remainder, same errors.
    #[test]
    fn compiled_matches_reference(rules in rules(), paths in vec(path(), 1..16), image in image(), case_sensitive in any::<bool>()) {
        let policy = CompiledPolicy::new(&rules, VolumeNames::AllowDriveLetters).unwrap();
        let image = image.map(|i| w(&i));
        let volume = Volume::Letter(b'C');
        for path in &paths {
            let path = w(path);
            let compiled = policy.match_path(&volume, &path, image.as_deref(), case_sensitive);
            let expected = reference::match_linear(&policy, &volume, &path, image.as_deref(), case_sensitive);
            let compiled_found = compiled.map(|m| m.as_ref().map(reference::found_of));
            prop_assert_eq!(compiled_found, expected, "path {:?}", String::from_utf16_lossy(&path));
            // could_match is a superset of every process's matches.
            if matches!(compiled, Ok(Some(_)) | Err(_)) {
                prop_assert!(policy.could_match(&volume, &path));
            }
        }
    }

    /// could_match is false only when no process could match.
    #[test]
    fn could_match_is_never_wrong_to_skip(rules in rules(), path in path()) {
        let policy = CompiledPolicy::new(&rules, VolumeNames::AllowDriveLetters).unwrap();
        let volume = Volume::Letter(b'C');
        let path = w(&path);
        if !policy.could_match(&volume, &path) {
            for image in [None, Some(w("a.exe")), Some(w("B.EXE")), Some(w(r"C:\Tools\t.exe"))] {
                prop_assert!(matches!(policy.match_path(&volume, &path, image.as_deref(), false), Ok(None)));
            }
        }
    }

    /// Arbitrary UTF-16 never makes the matcher panic.
    #[test]
    fn arbitrary_paths_never_panic(rules in rules(), path in vec(any::<u16>(), 0..64), image in option::of(vec(any::<u16>(), 0..16)), cs in any::<bool>()) {
        let policy = CompiledPolicy::new(&rules, VolumeNames::AllowDriveLetters).unwrap();
        let volume = Volume::Letter(b'C');
        let _ = policy.match_path(&volume, &path, image.as_deref(), cs);
        let _ = policy.could_match(&volume, &path);
    }

    /// Arbitrary rule text never makes validation panic.
    #[test]
    fn arbitrary_rules_never_panic(specs in vec((vec(any::<u16>(), 0..8), vec(any::<u16>(), 0..24), vec(any::<u16>(), 0..24)), 0..6)) {
        let specs: Vec<RuleSpec> = specs.into_iter().map(|(name, source, target)| RuleSpec {
            name, source, target, method: Method::Reparse, access: Access::ReadWrite, process: None,
        }).collect();
        let _ = CompiledPolicy::new(&specs, VolumeNames::AllowDriveLetters);
    }
}

fn any_rule() -> impl Strategy<Value = RuleSpec> {
    let text = |max| vec(any::<u16>(), 0..max);
    (text(8), text(40), text(40), prop::bool::ANY, prop::bool::ANY, option::of(text(12))).prop_map(
        |(name, source, target, forward, read_only, process)| RuleSpec {
            name,
            source,
            target,
            method: if forward { Method::Forward } else { Method::Reparse },
            access: if read_only { Access::ReadOnly } else { Access::ReadWrite },
            process,
        },
    )
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        Just(Request::ClearPolicy),
        Just(Request::GetStats),
        vec(any_rule(), 0..8).prop_map(Request::SetPolicy),
        any_rule().prop_map(Request::AddRule),
        vec(any::<u16>(), 0..32).prop_map(Request::RemoveRule),
        (any::<u32>(), any::<u32>())
            .prop_map(|(start_index, max_reply_bytes)| Request::ListRules { start_index, max_reply_bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// encode → decode is the identity for every request.
    #[test]
    fn requests_round_trip(id in any::<u64>(), request in any_request()) {
        let bytes = wire::encode_request(id, &request).unwrap();
        prop_assert_eq!(wire::decode_request(&bytes).unwrap(), (id, request));
    }

    /// Policy blobs round-trip.
    #[test]
    fn policies_round_trip(rules in vec(any_rule(), 0..8)) {
        let blob = wire::encode_policy(&rules).unwrap();
        prop_assert_eq!(wire::decode_policy(&blob).unwrap(), rules);
    }

    /// Arbitrary bytes never make a decoder panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        let _ = wire::decode_request(&bytes);
        let _ = wire::decode_reply(&bytes);
        let _ = wire::decode_policy(&bytes);
    }

    /// Valid messages with a few bytes changed never make a decoder panic, and are either rejected or decode to
    /// something that encodes back to the same bytes.
    #[test]
    fn mutated_messages_never_panic(request in any_request(), edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut bytes = wire::encode_request(1, &request).unwrap();
        for (index, value) in edits {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if let Ok((id, decoded)) = wire::decode_request(&bytes) {
            prop_assert_eq!(wire::encode_request(id, &decoded).unwrap(), bytes);
        }
    }
}
