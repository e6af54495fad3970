//! `shuntctl policy` end to end: the binary run on the example policy and on broken ones.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs, reason = "a panic in a test is a failed test")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.toml");
const GUID_C: &str = r"\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\";
const GUID_D: &str = r"\\?\Volume{11111111-2222-3333-4444-555555555555}\";

fn shuntctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shuntctl")).args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn scratch(name: &str, contents: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(stdout(output).trim()).unwrap()
}

#[test]
fn check_accepts_the_example_and_lists_rules_most_specific_first() {
    let output = shuntctl(&["policy", "check", EXAMPLE]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("4 rule(s)"), "{text}");
    let settings = text.find("legacy-settings").unwrap();
    let config = text.find("legacy-config").unwrap();
    let logs = text.find("app-logs").unwrap();
    assert!(settings < config && config < logs, "exact first, then longer prefixes:\n{text}");
}

#[test]
fn test_reports_the_rule_and_backing_path_of_the_readme_examples() {
    let cases = [
        (
            r"C:\Apps\Legacy\config\ui\theme.ini",
            Some("legacy.exe"),
            "legacy-config",
            r"D:\Overlay\Legacy\config\ui\theme.ini",
        ),
        (
            r"c:\APPS\legacy\Config\A.ini",
            Some(r"C:\Apps\Legacy\LEGACY.EXE"),
            "legacy-config",
            r"D:\Overlay\Legacy\config\A.ini",
        ),
        (r"C:\Apps\Legacy\settings.ini", None, "legacy-settings", r"D:\Overlay\Legacy\settings.ini"),
        (r"C:\Apps\Legacy\settings.ini::$DATA", None, "legacy-settings", r"D:\Overlay\Legacy\settings.ini"),
        (r"C:\Logs\2024\01\app.LOG", None, "app-logs", r"D:\Overlay\Logs\2024\01\app.LOG"),
        (r"C:\Logs\app.log", None, "app-logs", r"D:\Overlay\Logs\app.log"),
        (r"C:\Apps\Legacy\plugins\Render.DLL", None, "legacy-plugins", r"D:\Overlay\Legacy\plugins\Render.DLL"),
    ];
    for (path, process, rule, target) in cases {
        let mut args = vec!["policy", "test", EXAMPLE, path, "--json"];
        if let Some(process) = process {
            args.extend(["--process", process]);
        }
        let output = shuntctl(&args);
        assert_eq!(output.status.code(), Some(0), "{path}: {}", stderr(&output));
        assert_eq!(json(&output), serde_json::json!({"matched": true, "rule": rule, "target": target}), "{path}");
    }
    let output = shuntctl(&["policy", "test", EXAMPLE, r"C:\Apps\Legacy\settings.ini"]);
    assert_eq!(
        stdout(&output).trim(),
        r#"rule "legacy-settings" matches (forward, read-write): D:\Overlay\Legacy\settings.ini"#
    );
}

#[test]
fn test_exits_1_when_nothing_matches() {
    for (path, process) in [
        (r"C:\Apps\Legacy\config\a.ini", None),
        (r"C:\Apps\Legacy\config\a.ini", Some("other.exe")),
        (r"C:\Apps\Leg\config\a.ini", None),
        (r"C:\Logs\app.txt", None),
        (r"C:\Apps\Legacy\plugins\sub\x.dll", None),
        (r"E:\Apps\Legacy\settings.ini", None),
    ] {
        let mut args = vec!["policy", "test", EXAMPLE, path, "--json"];
        if let Some(process) = process {
            args.extend(["--process", process]);
        }
        let output = shuntctl(&args);
        assert_eq!(output.status.code(), Some(1), "{path}");
        assert_eq!(json(&output), serde_json::json!({"matched": false, "rule": null, "target": null}), "{path}");
    }
}

#[test]
fn case_sensitive_tests_compare_literals_exactly() {
    let output = shuntctl(&["policy", "test", EXAMPLE, r"C:\apps\legacy\settings.ini", "--case-sensitive"]);
    assert_eq!(output.status.code(), Some(1));
    let output = shuntctl(&["policy", "test", EXAMPLE, r"C:\Apps\Legacy\settings.ini", "--case-sensitive"]);
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn invalid_policies_exit_2_naming_rule_and_field() {
    let rule = |extra: &str| {
        format!(
            "version = 1\n[[rule]]\nname = \"legacy-config\"\nsource = 'C:\\Apps\\**'\ntarget = 'D:\\Overlay'\nmethod = \"forward\"\naccess = \"read-only\"\n{extra}"
        )
    };
    let cases = [
        (
            "wildcard.toml",
            rule("").replace(r"D:\Overlay", r"D:\Overlay\*"),
            r#"rule "legacy-config": target: wildcards are not allowed in a target"#,
        ),
        (
            "relative.toml",
            rule("").replace(r"C:\Apps\**", r"Apps\**"),
            r#"rule "legacy-config": source: must be an absolute path"#,
        ),
        (
            "cycle.toml",
            rule("").replace(r"D:\Overlay", r"C:\Apps\Overlay"),
            r#"rule "legacy-config": target: lies inside this rule's own source"#,
        ),
        ("unknown.toml", rule("colour = \"red\"\n"), "rule #1: unknown field `colour`"),
        ("method.toml", rule("").replace("\"forward\"", "\"copy\""), "rule #1: unknown variant `copy`"),
        ("version.toml", rule("").replace("version = 1", "version = 2"), "version: 2 is not supported"),
        (
            "duplicate.toml",
            format!("{}{}", rule(""), rule("").replace("version = 1\n", "").replace(r"C:\Apps\**", r"C:\Other\**")),
            r#"rule "legacy-config": name: is already the name of rule "legacy-config""#,
        ),
    ];
    for (name, contents, expected) in cases {
        let file = scratch(name, &contents);
        let output = shuntctl(&["policy", "check", file.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{name}");
        assert!(stderr(&output).contains(expected), "{name}: {}", stderr(&output));
    }
    let output = shuntctl(&["policy", "check", "/nonexistent/policy.toml"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn compile_writes_a_blob_with_volume_guids() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("policy.bin");
    let volume_c = format!("C:={GUID_C}");
    let volume_d = format!("d:={}", GUID_D.trim_end_matches('\\'));
    let output = shuntctl(&[
        "policy",
        "compile",
        EXAMPLE,
        "-o",
        out.to_str().unwrap(),
        "--volume",
        &volume_c,
        "--volume",
        &volume_d,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rules = shunt_protocol::wire::decode_policy(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(rules.len(), 4);
    let source = String::from_utf16(&rules[0].source).unwrap();
    assert_eq!(source, format!(r"{GUID_C}Apps\Legacy\config\**"));
    let target = String::from_utf16(&rules[0].target).unwrap();
    assert_eq!(target, format!(r"{GUID_D}Overlay\Legacy\config"));
    shunt_protocol::CompiledPolicy::new(&rules, shunt_protocol::VolumeNames::GuidsOnly).unwrap();
}

#[test]
fn compile_needs_a_mapping_for_every_drive_letter() {
    if cfg!(windows) {
        return; // Windows resolves drive letters itself.
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unmapped.bin");
    let volume_c = format!("C:={GUID_C}");
    let output = shuntctl(&["policy", "compile", EXAMPLE, "-o", out.to_str().unwrap(), "--volume", &volume_c]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(r#"rule "legacy-config": target: drive D: has no volume mapping"#),
        "{}",
        stderr(&output)
    );
    let output = shuntctl(&["policy", "compile", EXAMPLE, "-o", out.to_str().unwrap(), "--volume", "C:=D:"]);
    assert_eq!(output.status.code(), Some(2));
}
