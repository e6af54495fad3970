//! `cargo xtask ci`: every check CI runs, in the order that fails fastest.

use std::process::Command;

use anyhow::Result;

use crate::{
    build::{ARCHES, run},
    workspace_root,
};

/// The crates that are built for Windows: the kernel crates and shuntctl.
const WINDOWS_CRATES: [&str; 3] = ["shunt-filter", "shunt-protocol", "shuntctl"];

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(workspace_root()).args(args);
    command
}

fn step(name: &str) {
    println!("\n=== xtask ci: {name}");
}

/// Runs every check: formatting, clippy for the host and both Windows targets, docs, the drivers and the
/// package, then every test of the workspace (which includes the PE, INF, signature and import-coverage tests
/// that read what the package step built).
///
/// # Errors
/// The first check that failed.
pub fn run_all() -> Result<()> {
    step("cargo fmt --check");
    run(&mut cargo(&["fmt", "--all", "--check"]))?;

    step("clippy (host)");
    run(&mut cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    for arch in &ARCHES {
        step(&format!("clippy ({})", arch.driver_target));
        let mut args = vec!["clippy", "--locked", "--target", arch.driver_target];
        for krate in WINDOWS_CRATES {
            args.extend(["--package", krate]);
        }
        args.extend(["--", "-D", "warnings"]);
        run(&mut cargo(&args))?;
    }

    step("cargo doc");
    let mut doc = cargo(&["doc", "--workspace", "--no-deps", "--locked"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(&mut doc)?;

    step("drivers and package");
    crate::package::run()?;

    step("tests");
    let totals = run_tests(&mut cargo(&["test", "--workspace", "--locked"]))?;
    // One plain closing line for the whole run: cargo's own last line is a doc-test summary that is often empty.
    println!("\ntests: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.ignored);
    Ok(())
}

/// Test counts summed over every `test result:` line of a cargo test run.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds the counts of one libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else { continue };
            let Ok(count) = count.parse::<u64>() else { continue };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs the tests, echoing their output, and sums the per-binary results.
fn run_tests(command: &mut Command) -> Result<Totals> {
    use std::io::{BufRead, BufReader};

    let shown = format!("{command:?}");
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("\ntests: {} passed, {} failed, {} skipped", totals.passed, totals.failed.max(1), totals.ignored);
        anyhow::bail!("{shown} failed with {status}");
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn libtest_summaries_are_summed() {
        let mut totals = Totals::default();
        totals
            .add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        totals.add_line("test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add_line("running 3 tests");
        assert_eq!(totals, Totals { passed: 8, failed: 2, ignored: 1 });
    }
}
