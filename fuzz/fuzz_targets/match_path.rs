//! Validation, compilation and matching on arbitrary rules and paths: no panic, and the compiled matcher agrees
//! with the reference matcher.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shunt_protocol::{Access, CompiledPolicy, Method, RuleSpec, Volume, VolumeNames, reference};

fn units(bytes: &[u8]) -> Vec<u16> {
    // Bias towards path characters so inputs reach the matcher: bytes map to a small alphabet, pairs to any unit.
    const ALPHABET: &[u8] = b"\\\\\\*?.:~aAbB";
    bytes.iter().map(|&b| u16::from(ALPHABET[usize::from(b) % ALPHABET.len()])).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xFF);
    let path = units(parts.next().unwrap_or_default());
    let specs: Vec<RuleSpec> = parts
        .take(16)
        .enumerate()
        .map(|(i, source)| {
            let mut full: Vec<u16> = "C:\\".encode_utf16().collect();
            full.extend(units(source));
            RuleSpec {
                name: format!("r{i}").encode_utf16().collect(),
                source: full,
                target: format!("Z:\\t{i}").encode_utf16().collect(),
                method: Method::Reparse,
                access: Access::ReadWrite,
                process: None,
            }
        })
        .collect();
    let Ok(policy) = CompiledPolicy::new(&specs, VolumeNames::AllowDriveLetters) else { return };
    let volume = Volume::Letter(b'C');
    for case_sensitive in [false, true] {
        let compiled = policy.match_path(&volume, &path, None, case_sensitive);
        let expected = reference::match_linear(&policy, &volume, &path, None, case_sensitive);
        assert_eq!(compiled.map(|m| m.as_ref().map(reference::found_of)), expected);
    }
    let _ = policy.could_match(&volume, &path);
});
