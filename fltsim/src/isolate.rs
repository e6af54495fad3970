//! Running each driver scenario in its own process.
//!
//! A driver keeps its state in statics, and a real kernel gives every load a freshly mapped image. In one test
//! process the statics of a previous load would still be there, so every test that loads a driver runs in a child
//! process: the test binary re-executes itself with the test's exact name and [`CHILD_ENV`] set, and the child runs
//! the body. This works under `cargo test` (threads in one process) and `cargo nextest` alike.
//!
//! Use [`scenario!`](crate::scenario) to declare such a test.

use std::{
    env,
    process::{Command, Output},
};

/// The environment variable that tells a re-executed test binary which test it runs as a child.
pub const CHILD_ENV: &str = "FLTSIM_ISOLATED_TEST";

/// What a child prints first, followed by its process id, so a parent can tell children apart.
pub const PID_MARKER: &str = "fltsim-child-pid=";

/// The test name libtest uses for a function at `module_path` (which starts with the crate name) called `name`.
#[must_use]
pub fn test_name(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    }
}

/// Whether this process is the child running `test`.
#[must_use]
pub fn is_child(test: &str) -> bool {
    env::var(CHILD_ENV).is_ok_and(|v| v == test)
}

/// Runs the test `test` of the current test binary in a child process and returns its output.
///
/// # Panics
/// When the current executable cannot be found or started: the test cannot run at all.
#[must_use]
pub fn run_child(test: &str) -> Output {
    run_child_with(test, &[])
}

/// As [`run_child`], with extra environment variables for the child (how a parent tells it which case to run).
///
/// # Panics
/// As [`run_child`].
#[must_use]
pub fn run_child_with(test: &str, vars: &[(&str, &str)]) -> Output {
    let exe = env::current_exe().unwrap_or_else(|e| panic!("cannot find the test binary: {e}"));
    Command::new(exe)
        .envs(vars.iter().copied())
        // `--include-ignored` lets a parent run a scenario that is `#[ignore]`d on its own, such as a deliberately
        // failing one that only exists to be run as a child.
        .args([test, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
        .env(CHILD_ENV, test)
        .output()
        .unwrap_or_else(|e| panic!("cannot start the test binary for {test}: {e}"))
}

/// The process id a child printed, if any.
#[must_use]
pub fn child_pid(output: &Output) -> Option<u32> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        // libtest may print the test's name on the same line before the child's own output.
        .find_map(|l| l.split_once(PID_MARKER).and_then(|(_, p)| p.split_whitespace().next()?.parse().ok()))
}

/// Runs `body` in a child process dedicated to `test`: in the parent, starts the child and fails unless it ran
/// exactly that test and passed; in the child, runs `body`.
///
/// # Panics
/// In the parent, when the child failed, crashed (a bugcheck aborts it) or did not run the test; the message holds
/// the child's output.
pub fn run(test: &str, body: impl FnOnce()) {
    if is_child(test) {
        println!("{PID_MARKER}{}", std::process::id());
        body();
        return;
    }
    let output = run_child(test);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let ran = stdout.contains("1 passed") || stdout.contains("test result: ok. 1 passed");
    assert!(
        output.status.success() && ran,
        "isolated test {test} failed in its own process ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

/// Declares a `#[test]` whose body runs in its own process (see [`run`]).
///
/// ```ignore
/// fltsim::scenario! {
///     fn loads_and_unloads() {
///         // ... load a driver ...
///     }
/// }
/// ```
#[macro_export]
macro_rules! scenario {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let test = $crate::isolate::test_name(module_path!(), stringify!($name));
            $crate::isolate::run(&test, || $body);
        }
    };
}
