//! Each verifier check fires on a deliberately wrong filter, and stays quiet on a correct one. Every scenario runs
//! in its own process; a broken rule produces a report, and the process carries on.

mod common;

use common::Fault;
use fltsim::{
    LoadError, Rule, isolate,
    kernel::pool,
    kernel::thread,
    scenario,
    verifier::{self, take_reports, take_rules},
};
use windows_sys::{
    Wdk::System::SystemServices::ExAllocatePool2,
    Win32::Foundation::{STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER},
};

/// Loads the test filter with `fault`, unloads it, and returns the rules broken.
fn cycle(fault: Fault) -> Vec<Rule> {
    let mut driver = common::load(fault).expect("the test filter loads");
    driver.unload(false).expect("the test filter unloads");
    take_rules()
}

scenario! {
    fn a_correct_filter_breaks_no_rule() {
        assert_eq!(cycle(Fault::None), []);
        assert!(pool::live().is_empty());
    }
}

scenario! {
    fn double_free_is_reported_and_the_process_goes_on() {
        assert_eq!(cycle(Fault::DoubleFree), [Rule::PoolDoubleFree]);
        // The report carries the context of the call.
        let mut driver = common::load(Fault::None).err();
        assert!(matches!(driver.take(), Some(LoadError::AlreadyLoadedInProcess)));
    }
}

scenario! {
    fn freeing_what_was_never_allocated_is_reported() {
        assert_eq!(cycle(Fault::FreeNotAllocated), [Rule::PoolFreeNotAllocated]);
    }
}

scenario! {
    fn a_tag_mismatch_is_reported_and_the_memory_kept() {
        assert_eq!(cycle(Fault::TagMismatch), [Rule::PoolTagMismatch]);
        assert!(pool::live().is_empty(), "the second, correct free released it");
    }
}

scenario! {
    fn a_zero_tag_is_reported_and_fails() {
        assert_eq!(cycle(Fault::ZeroTag), [Rule::PoolInvalidRequest]);
    }
}

scenario! {
    fn pool_left_at_unload_is_reported_as_a_leak() {
        let rules = cycle(Fault::LeakAtUnload);
        assert_eq!(rules, [Rule::PoolLeak]);
    }
}

scenario! {
    fn unload_without_unregistering_is_reported() {
        assert_eq!(cycle(Fault::UnloadWithoutUnregister), [Rule::FilterNotUnregistered]);
    }
}

scenario! {
    fn a_failed_driver_entry_that_stays_registered_is_reported() {
        let result = common::load(Fault::FailEntryStillRegistered);
        assert!(matches!(result, Err(LoadError::EntryFailed(s)) if s == STATUS_INSUFFICIENT_RESOURCES));
        let rules: Vec<Rule> = take_rules();
        assert_eq!(rules, [Rule::FilterNotUnregistered, Rule::PoolLeak]);
    }
}

scenario! {
    fn a_registration_of_the_wrong_size_is_rejected() {
        let result = common::load(Fault::WrongRegistrationSize);
        assert!(matches!(result, Err(LoadError::EntryFailed(s)) if s == STATUS_INVALID_PARAMETER));
        let reports = take_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].rule, Rule::RegistrationInvalid);
        assert!(reports[0].detail.contains("Size"), "{}", reports[0].detail);
    }
}

scenario! {
    fn an_operation_table_without_its_terminator_is_rejected() {
        let result = common::load(Fault::NoOperationTerminator);
        assert!(matches!(result, Err(LoadError::EntryFailed(s)) if s == STATUS_INVALID_PARAMETER));
        let reports = take_reports();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].detail.contains("IRP_MJ_OPERATION_END"), "{}", reports[0].detail);
    }
}

scenario! {
    fn starting_a_handle_that_is_not_a_filter_is_reported() {
        let rules = cycle(Fault::StartBogusHandle);
        assert_eq!(rules, [Rule::InvalidFilterHandle]);
    }
}

scenario! {
    fn paged_pool_at_dispatch_level_is_reported_with_the_thread_state() {
        let p = thread::at_irql(fltsim::kernel::irql::DISPATCH, || {
            // SAFETY: plain values; the model checks the IRQL.
            unsafe { ExAllocatePool2(0x100, 16, common::TAG) }
        });
        assert!(p.is_null(), "the allocation fails");
        let reports = take_reports();
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.rule, Rule::IrqlTooHigh);
        assert_eq!(report.api, "ExAllocatePool2");
        assert_eq!(report.thread.irql, fltsim::kernel::irql::DISPATCH);
        assert!(report.thread.all_apcs_disabled());
        assert!(report.to_string().contains("DISPATCH_LEVEL"), "{report}");
        assert!(report.rule.docs().starts_with("https://learn.microsoft.com/"));
    }
}

scenario! {
    fn injected_allocation_failures_follow_the_plan() {
        pool::set_failure_plan(pool::FailurePlan::Nth(2));
        // SAFETY: plain values.
        let first = unsafe { ExAllocatePool2(common::NON_PAGED, 16, common::TAG) };
        // SAFETY: as above.
        let second = unsafe { ExAllocatePool2(common::NON_PAGED, 16, common::TAG) };
        assert!(!first.is_null() && second.is_null());
        assert_eq!(pool::stats().injected_failures, 1);
        // SAFETY: `first` is live and tagged TAG.
        unsafe { windows_sys::Wdk::System::SystemServices::ExFreePoolWithTag(first, common::TAG) };
        assert!(take_reports().is_empty(), "an injected failure is not a broken rule");
    }
}

scenario! {
    /// Runs only as a child of `a_bugcheck_ends_the_child_with_its_stop_code`.
    #[ignore = "run as a child process by a_bugcheck_ends_the_child_with_its_stop_code"]
    fn bugcheck_child() {
        // SAFETY: plain values; the model ends the process.
        unsafe { windows_sys::Wdk::System::SystemServices::KeBugCheckEx(0x5348_4E54, 1, 2, 3, 4) };
    }
}

scenario! {
    /// Runs only as a child of `a_failing_scenario_fails_its_parent`.
    #[ignore = "run as a child process by a_failing_scenario_fails_its_parent"]
    fn failing_child() {
        verifier::report(Rule::PoolLeak, "test", "deliberate");
        assert!(take_reports().is_empty(), "deliberately failing");
    }
}

#[test]
fn a_bugcheck_ends_the_child_with_its_stop_code() {
    let output = isolate::run_child("bugcheck_child");
    assert!(!output.status.success(), "a bugcheck never returns");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("STOP 0x53484e54 (0x1, 0x2, 0x3, 0x4)"), "{stderr}");
}

#[test]
fn a_failing_scenario_fails_its_parent() {
    let output = isolate::run_child("failing_child");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("deliberately failing"));
}
