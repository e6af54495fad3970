//! The `shuntctl policy test` examples in the README are run as written, and must print what the README shows:
//! exit 0 for a match, 1 for none.

use std::process::Command;

/// Splits a shell command line with single-quoted arguments (all the README uses).
fn split(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    args.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            _ => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(current);
    }
    args
}

#[test]
fn the_readme_policy_examples_print_what_the_readme_shows() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let block = readme.split("```console\n").nth(1).expect("a console block").split("```").next().expect("its end");
    let mut lines = block.lines().peekable();
    let mut checked = 0;
    while let Some(line) = lines.next() {
        let Some(command) = line.strip_prefix("$ shuntctl ") else { continue };
        let expected = lines.next().expect("an output line after each command");
        let args = split(command);
        let output = Command::new(env!("CARGO_BIN_EXE_shuntctl")).args(&args).current_dir(root).output().expect("run");
        let printed = String::from_utf8_lossy(&output.stdout);
        assert_eq!(printed.trim_end(), expected, "shuntctl {command}");
        let matched = expected.contains(" matches ") || expected.contains("\"matched\":true");
        let expected_code = i32::from(!matched);
        assert_eq!(output.status.code(), Some(expected_code), "exit code of shuntctl {command}");
        checked += 1;
    }
    assert_eq!(checked, 4, "the README shows four examples");
}
