//! `shuntctl policy`: check, test and compile policy files on any host.
//!
//! The TOML file is parsed here (std, serde) into `shunt_protocol`'s rule model, which validates and compiles it
//! exactly as the driver will. Drive letters are accepted for `check` and `test`; `compile` turns them into volume
//! GUIDs, from `--volume` mappings or, on Windows, by asking the system.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::Subcommand;
use serde::Deserialize;
use shunt_protocol::{
    Access, CompiledPolicy, Field, Guid, Method, NameError, PatternClass, PolicyError, RuleSpec, Volume, VolumeNames,
    name::split_volume,
    wire::{self, encode_compiled_policy},
};

use crate::error::CliError;

/// The policy file format version this shuntctl reads.
const FILE_VERSION: u32 = 1;

/// `shuntctl policy ...`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file and print its rules as compiled, most specific first.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Show which rule a path matches and the backing path it is redirected to (exit 1 if none matches).
    Test {
        /// The policy file (TOML).
        file: PathBuf,
        /// A full path: `C:\Apps\Legacy\settings.ini` or `\\?\Volume{GUID}\...`.
        path: String,
        /// The opening process: an image name or a full image path.
        #[arg(long)]
        process: Option<String>,
        /// Match as a create with `SL_CASE_SENSITIVE` would.
        #[arg(long)]
        case_sensitive: bool,
        /// Print one JSON object: {"matched": bool, "rule": name|null, "target": path|null}.
        #[arg(long)]
        json: bool,
    },
    /// Compile a policy file into the blob the driver loads (drive letters replaced by volume GUIDs).
    Compile {
        /// The policy file (TOML).
        file: PathBuf,
        /// Where to write the blob.
        #[arg(short, long)]
        output: PathBuf,
        /// A drive letter's volume: `C:=\\?\Volume{GUID}\` (repeatable). Required for each drive letter the
        /// policy uses, except on Windows, where unmapped letters are resolved with `GetVolumeNameForVolumeMountPointW`.
        #[arg(long = "volume", value_name = "LETTER:=VOLUME")]
        volumes: Vec<String>,
    },
}

/// Runs a policy subcommand.
///
/// # Errors
/// [`CliError::Policy`] and [`CliError::Io`] (exit 2), [`CliError::NoMatch`] when `test` matches nothing (exit 1).
pub fn run(command: PolicyCommand) -> Result<(), CliError> {
    match command {
        PolicyCommand::Check { file } => check(&file),
        PolicyCommand::Test { file, path, process, case_sensitive, json } => {
            test(&file, &path, process.as_deref(), case_sensitive, json)
        }
        PolicyCommand::Compile { file, output, volumes } => compile(&file, &output, &volumes),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: String,
    source: String,
    target: String,
    method: MethodName,
    access: AccessName,
    #[serde(default)]
    process: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum MethodName {
    Forward,
    Reparse,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum AccessName {
    ReadOnly,
    ReadWrite,
}

fn utf16(text: &str) -> Vec<u16> {
    text.encode_utf16().collect()
}

fn text(units: &[u16]) -> String {
    String::from_utf16_lossy(units)
}

fn policy_error(file: &Path, message: impl Into<String>) -> CliError {
    CliError::Policy { file: file.display().to_string(), message: message.into() }
}

/// Reads a policy file into rule specs.
fn load(file: &Path) -> Result<Vec<RuleSpec>, CliError> {
    let contents =
        std::fs::read_to_string(file).map_err(|source| CliError::Io { path: file.display().to_string(), source })?;
    let parsed: PolicyFile = toml::from_str(&contents).map_err(|error| {
        // Name the rule the error is in: count the [[rule]] tables that start before it.
        let at = error.span().map_or(0, |span| span.start);
        let before = contents.get(..at).unwrap_or_default();
        let index = before.lines().filter(|line| line.trim_start().starts_with("[[rule]]")).count();
        let label = if index == 0 { String::new() } else { format!("rule #{index}: ") };
        policy_error(file, format!("line {}: {label}{}", line_of(&contents, at), error.message()))
    })?;
    if parsed.version != FILE_VERSION {
        return Err(policy_error(
            file,
            format!("version: {} is not supported (this shuntctl reads version {FILE_VERSION})", parsed.version),
        ));
    }
    Ok(parsed
        .rules
        .into_iter()
        .map(|rule| RuleSpec {
            name: utf16(&rule.name),
            source: utf16(&rule.source),
            target: utf16(&rule.target),
            method: match rule.method {
                MethodName::Forward => Method::Forward,
                MethodName::Reparse => Method::Reparse,
            },
            access: match rule.access {
                AccessName::ReadOnly => Access::ReadOnly,
                AccessName::ReadWrite => Access::ReadWrite,
            },
            process: rule.process.as_deref().map(utf16),
        })
        .collect())
}

fn line_of(contents: &str, offset: usize) -> usize {
    contents.get(..offset).map_or(0, |before| before.lines().count().max(1))
}

fn compile_specs(file: &Path, specs: &[RuleSpec], volumes: VolumeNames) -> Result<CompiledPolicy, CliError> {
    CompiledPolicy::new(specs, volumes).map_err(|error| policy_error(file, describe(&error, specs)))
}

fn describe(error: &PolicyError, specs: &[RuleSpec]) -> String {
    error.describe(specs).to_string()
}

fn class_name(class: PatternClass) -> &'static str {
    match class {
        PatternClass::Exact => "exact file",
        PatternClass::Subtree => "subtree",
        PatternClass::SubtreeSuffix => "subtree by extension",
        PatternClass::Glob => "glob",
    }
}

fn check(file: &Path) -> Result<(), CliError> {
    let specs = load(file)?;
    let policy = compile_specs(file, &specs, VolumeNames::AllowDriveLetters)?;
    let mut rules: Vec<_> = policy.rules().collect();
    rules.sort_by_key(shunt_protocol::Rule::rank);
    let mut out = String::new();
    let footprint = policy.footprint();
    let _ = writeln!(
        out,
        "{}: {} rule(s) on {} volume(s), valid; {} bytes compiled (strings {} bytes)",
        file.display(),
        policy.len(),
        policy.volumes().len(),
        footprint.structure + footprint.strings,
        footprint.strings
    );
    let _ = writeln!(out, "rules, most specific first:");
    for rule in rules {
        let _ = writeln!(out, "{:>4}. {}", rule.rank() + 1, text(rule.name()));
        let _ = writeln!(out, "      source:  {}  [{}]", text(rule.source()), class_name(rule.class()));
        let _ = writeln!(out, "      prefix:  {}{}", rule.source_volume(), text(rule.literal_prefix()));
        let _ = writeln!(out, "      target:  {}", text(rule.target()));
        let _ = writeln!(out, "      method:  {}, {}", rule.method().as_str(), rule.access().as_str());
        if let Some(process) = rule.process() {
            let _ = writeln!(out, "      process: {}", text(process));
        }
    }
    print!("{out}");
    Ok(())
}

fn test(file: &Path, path: &str, process: Option<&str>, case_sensitive: bool, json: bool) -> Result<(), CliError> {
    let specs = load(file)?;
    let policy = compile_specs(file, &specs, VolumeNames::AllowDriveLetters)?;
    let units = utf16(path);
    let (volume, within) = split_volume(&units).ok_or_else(|| CliError::Usage {
        message: format!(r"{path}: give a full path, starting with a drive letter (C:\) or \\?\Volume{{GUID}}\"),
    })?;
    let process = process.map(utf16);
    let found =
        policy.match_path(&volume, within, process.as_deref(), case_sensitive).map_err(|error: NameError| {
            CliError::Usage {
                message: format!("{path}: the driver refuses this name with STATUS_OBJECT_NAME_INVALID: {error}"),
            }
        })?;
    let result = found.map(|found| {
        let backing = found.backing_path().unwrap_or_default();
        (text(found.rule().name()), format!("{}{}", found.backing_volume(), text(&backing)), found.rule())
    });
    if json {
        let value = match &result {
            Some((name, target, _)) => serde_json::json!({ "matched": true, "rule": name, "target": target }),
            None => serde_json::json!({ "matched": false, "rule": null, "target": null }),
        };
        println!("{value}");
    } else if let Some((name, target, rule)) = &result {
        println!("rule \"{name}\" matches ({}, {}): {target}", rule.method().as_str(), rule.access().as_str());
    } else {
        println!("no rule matches {path}");
    }
    if result.is_some() { Ok(()) } else { Err(CliError::NoMatch { path: path.to_owned() }) }
}

/// Parses `C:=\\?\Volume{GUID}\` (the trailing `\` optional).
fn parse_mapping(mapping: &str) -> Result<(u8, Guid), CliError> {
    let bad = || CliError::Usage {
        message: format!(
            r"--volume {mapping}: expected LETTER:=\\?\Volume{{GUID}}\, e.g. C:=\\?\Volume{{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}}\"
        ),
    };
    let (letter, volume) = mapping.split_once('=').ok_or_else(bad)?;
    let letter = match letter.as_bytes() {
        [letter, b':'] if letter.is_ascii_alphabetic() => letter.to_ascii_uppercase(),
        _ => return Err(bad()),
    };
    let volume = if volume.ends_with('\\') { volume.to_owned() } else { format!("{volume}\\") };
    match split_volume(&utf16(&volume)) {
        Some((Volume::Guid(guid), rest)) if rest.len() == 1 => Ok((letter, guid)),
        _ => Err(bad()),
    }
}

/// Rewrites a path's drive letter as its volume GUID.
fn map_path(
    file: &Path,
    spec: &RuleSpec,
    field: Field,
    units: &[u16],
    mappings: &[(u8, Guid)],
) -> Result<Vec<u16>, CliError> {
    let Some((Volume::Letter(letter), rest)) = split_volume(units) else { return Ok(units.to_vec()) };
    let guid = match mappings.iter().find(|(l, _)| *l == letter) {
        Some((_, guid)) => *guid,
        None => resolve_letter(letter).ok_or_else(|| {
            policy_error(
                file,
                format!(
                    "rule \"{}\": {}: drive {}: has no volume mapping; pass --volume {}:=\\\\?\\Volume{{GUID}}\\",
                    text(&spec.name),
                    field.as_str(),
                    char::from(letter),
                    char::from(letter)
                ),
            )
        })?,
    };
    let mut mapped = utf16(&format!("\\\\?\\Volume{guid}"));
    mapped.extend_from_slice(rest);
    Ok(mapped)
}

fn compile(file: &Path, output: &Path, volumes: &[String]) -> Result<(), CliError> {
    let mappings = volumes.iter().map(|m| parse_mapping(m)).collect::<Result<Vec<_>, _>>()?;
    let specs = load(file)?;
    // Validate with the file's own spelling first, so errors quote what the administrator wrote.
    compile_specs(file, &specs, VolumeNames::AllowDriveLetters)?;
    let mut mapped = Vec::with_capacity(specs.len());
    for spec in &specs {
        let process = match &spec.process {
            Some(process) if process.contains(&u16::from(b'\\')) => {
                Some(map_path(file, spec, Field::Process, process, &mappings)?)
            }
            other => other.clone(),
        };
        mapped.push(RuleSpec {
            source: map_path(file, spec, Field::Source, &spec.source, &mappings)?,
            target: map_path(file, spec, Field::Target, &spec.target, &mappings)?,
            process,
            ..spec.clone()
        });
    }
    let policy = compile_specs(file, &mapped, VolumeNames::GuidsOnly)?;
    let blob = encode_compiled_policy(&policy)
        .map_err(|error: wire::WireError| policy_error(file, format!("cannot encode the policy: {error}")))?;
    std::fs::write(output, &blob).map_err(|source| CliError::Io { path: output.display().to_string(), source })?;
    println!("{}: {} rule(s), {} bytes written to {}", file.display(), policy.len(), blob.len(), output.display());
    Ok(())
}

/// Resolves a drive letter to its volume GUID on Windows; elsewhere there is nothing to ask.
#[cfg(not(windows))]
fn resolve_letter(_letter: u8) -> Option<Guid> {
    None
}

/// Resolves a drive letter to its volume GUID with `GetVolumeNameForVolumeMountPointW`.
#[cfg(windows)]
fn resolve_letter(letter: u8) -> Option<Guid> {
    use windows_sys::Win32::Storage::FileSystem::GetVolumeNameForVolumeMountPointW;
    let mount_point = utf16(&format!("{}:\\\0", char::from(letter)));
    let mut name = [0u16; 64];
    let capacity = u32::try_from(name.len()).ok()?;
    // SAFETY: `mount_point` is NUL-terminated and outlives the call; `name` holds `capacity` units.
    if unsafe { GetVolumeNameForVolumeMountPointW(mount_point.as_ptr(), name.as_mut_ptr(), capacity) } == 0 {
        return None;
    }
    let length = name.iter().position(|&u| u == 0)?;
    match split_volume(name.get(..length)?) {
        Some((Volume::Guid(guid), _)) => Some(guid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use shunt_protocol::Problem;

    use super::*;

    #[test]
    fn volume_mappings_parse() {
        let (letter, guid) = parse_mapping(r"c:=\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\").unwrap();
        assert_eq!(letter, b'C');
        assert_eq!(guid.to_string(), "{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}");
        assert!(parse_mapping(r"C:=\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}").is_ok());
        for bad in ["C:", r"C=\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\", r"C:=D:\", r"C:=\\?\Volume{x}\"] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn problems_have_messages_that_name_rule_and_field() {
        let spec = RuleSpec {
            name: utf16("legacy-config"),
            source: utf16(r"C:\Apps\**"),
            target: utf16(r"D:\Overlay\*"),
            method: Method::Forward,
            access: Access::ReadOnly,
            process: None,
        };
        let error = CompiledPolicy::new(std::slice::from_ref(&spec), VolumeNames::AllowDriveLetters).unwrap_err();
        assert_eq!(error.problem, Problem::Wildcard);
        assert_eq!(describe(&error, &[spec]), r#"rule "legacy-config": target: wildcards are not allowed in a target"#);
    }
}
