//! Keeps panics inside the model from crossing an `extern "system"` boundary.
//!
//! A panic that unwinds out of an `extern "system"` function aborts the whole test process, taking every other
//! result with it. Each export runs its body through [`guarded`]: a panic there is a bug in the model, reported as
//! [`Rule::ModelFault`] while the export returns its failure value.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::verifier::{self, Rule};

/// Runs `body` for the export `api`, turning a panic into a report and `on_panic`.
pub(crate) fn guarded<T>(api: &'static str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-string payload".to_owned());
            verifier::report(Rule::ModelFault, api, format!("the model panicked: {message}"));
            on_panic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_an_export_becomes_a_report_and_the_failure_value() {
        let value = guarded("TestExport", -1, || -> i32 { panic!("model bug") });
        assert_eq!(value, -1);
        let reports = verifier::take_reports();
        assert!(
            reports
                .iter()
                .any(|r| r.rule == Rule::ModelFault && r.api == "TestExport" && r.detail.contains("model bug")),
            "{reports:?}"
        );
    }
}
