//! The seam between the driver and fltsim: the real `DriverEntry` registers with the model, starts filtering, and
//! unloads cleanly; the model's registry comes from `inf/shunt.inf`; pool allocations of the driver reach the
//! model, where they can fail; each load runs in its own process.
#![cfg(not(windows))]

use fltsim::{
    LoadError,
    fltmgr::{FilterRecord, OperationRecord},
    isolate,
    kernel::pool::{self, FailurePlan, tag_name},
    registry, scenario, verifier,
};
use shunt_tests::install_shunt_inf;
use windows_sys::Win32::Foundation::{STATUS_INSUFFICIENT_RESOURCES, STATUS_OBJECT_NAME_NOT_FOUND};

const IRP_MJ_CREATE: u8 = 0;

fn shunt_filter(filters: &[FilterRecord]) -> FilterRecord {
    assert_eq!(filters.len(), 1, "Shunt registers exactly one filter: {filters:?}");
    filters[0].clone()
}

fn globals_allocations() -> usize {
    pool::live().iter().filter(|a| tag_name(a.tag) == "ShGl").count()
}

scenario! {
    /// DriverEntry → FltRegisterFilter → FltStartFiltering → unload → FltUnregisterFilter, and what the model
    /// recorded on the way.
    fn driver_entry_registers_starts_and_unloads_cleanly() {
        install_shunt_inf();
        let mut driver = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry).expect("DriverEntry succeeds");

        let filter = shunt_filter(&driver.filters());
        assert_eq!(filter.service, "shunt");
        assert_eq!(filter.version, 0x0203, "FLT_REGISTRATION_VERSION");
        assert_eq!(filter.operations, [OperationRecord { major: IRP_MJ_CREATE, flags: 0, pre: true, post: false }]);
        assert!(filter.has_unload, "an unload callback, without which the filter could not unload");
        assert!(filter.has_instance_setup && filter.has_instance_query_teardown);
        assert!(filter.has_instance_teardown_start && filter.has_instance_teardown_complete);
        assert!(filter.started, "FltStartFiltering was called");
        assert_eq!(filter.default_instance.as_deref(), Some("Shunt Instance"));
        assert_eq!(filter.instances.len(), 1);
        assert_eq!(filter.instances[0].altitude, shunt::ALTITUDE);
        assert_eq!(globals_allocations(), 1, "the driver's globals live in pool tagged ShGl");

        driver.unload(false).expect("a non-mandatory unload succeeds");
        let filter = shunt_filter(&driver.filters());
        assert!(filter.unregistered && !filter.started, "FltUnregisterFilter was called");
        assert_eq!(globals_allocations(), 0, "the globals were freed");
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "Shunt broke rules: {reports:#?}");
    }
}

scenario! {
    /// Windows: FltRegisterFilter fails with STATUS_OBJECT_NAME_NOT_FOUND when the Instances key is missing, and
    /// DriverEntry returns that status having left nothing behind.
    fn register_fails_without_the_instances_key() {
        install_shunt_inf();
        assert!(registry::delete_tree(&registry::instances_key(shunt::SERVICE_NAME)));
        match fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry) {
            Err(LoadError::EntryFailed(status)) => assert_eq!(status, STATUS_OBJECT_NAME_NOT_FOUND),
            Err(other) => panic!("unexpected load error: {other}"),
            Ok(_) => panic!("DriverEntry succeeded without an Instances key"),
        }
        assert!(fltsim::fltmgr::filters().is_empty());
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

scenario! {
    /// Before Windows 11 24H2 the INF's legacy section writes the instances under the service key, where that
    /// build reads them; a 24H2 build does not read that location.
    fn instances_are_read_where_each_windows_build_reads_them() {
        registry::set_windows_build(19045);
        install_shunt_inf();
        let service = registry::service_key(shunt::SERVICE_NAME);
        assert!(registry::key(&format!(r"{service}\Instances")).is_some());
        assert!(registry::key(&format!(r"{service}\Parameters\Instances")).is_none());

        registry::set_windows_build(registry::BUILD_24H2);
        match fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry) {
            Err(LoadError::EntryFailed(status)) => assert_eq!(status, STATUS_OBJECT_NAME_NOT_FOUND),
            other => panic!("a 24H2 build must not find legacy-only instances: {:?}", other.err()),
        }
    }
}

scenario! {
    /// The driver's pool allocations reach the model, where they can be made to fail: DriverEntry then fails with
    /// STATUS_INSUFFICIENT_RESOURCES and unregisters the filter it had registered.
    fn a_failed_allocation_in_driver_entry_unwinds_cleanly() {
        install_shunt_inf();
        pool::set_failure_plan(FailurePlan::Tag(u32::from_le_bytes(*b"ShGl")));
        match fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry) {
            Err(LoadError::EntryFailed(status)) => assert_eq!(status, STATUS_INSUFFICIENT_RESOURCES),
            other => panic!("expected the injected failure: {:?}", other.err()),
        }
        assert_eq!(pool::stats().injected_failures, 1);
        let filters = fltsim::fltmgr::filters();
        assert!(filters.iter().all(|f| f.unregistered), "the registered filter was unregistered: {filters:?}");
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

/// The environment variable that tells `driver_entry_with_one_site_failing` which site to fail.
const FAIL_SITE_ENV: &str = "SHUNT_TEST_FAIL_SITE";

scenario! {
    /// Runs only as a child of `each_allocation_site_of_driver_entry_fails_cleanly`: loads Shunt with the n-th
    /// distinct allocation site failing and prints what happened.
    #[ignore = "run as a child process by each_allocation_site_of_driver_entry_fails_cleanly"]
    fn driver_entry_with_one_site_failing() {
        let n: usize = std::env::var(FAIL_SITE_ENV).ok().and_then(|v| v.parse().ok()).expect("the site to fail");
        install_shunt_inf();
        pool::set_failure_plan(FailurePlan::NthSite(n));
        let loaded = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry);
        let failed = pool::stats().injected_failures;
        match loaded {
            Ok(mut driver) => driver.unload(false).expect("unload"),
            Err(LoadError::EntryFailed(status)) => {
                assert_eq!(status, STATUS_INSUFFICIENT_RESOURCES, "a failed allocation fails DriverEntry with it");
            }
            Err(other) => panic!("load failed otherwise: {other:?}"),
        }
        let filters = fltsim::fltmgr::filters();
        assert!(filters.iter().all(|f| f.unregistered), "nothing stays registered: {filters:?}");
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
        println!("site-outcome: failed={failed} reached={}", pool::sites_reached_by_plan());
    }
}

/// Driver Verifier's systematic low resources simulation on Shunt's load and unload: each allocation site reached
/// fails once in turn (one child process per site, since a driver loads once per process), and each time
/// DriverEntry fails cleanly or copes, with nothing leaked or left registered.
#[test]
fn each_allocation_site_of_driver_entry_fails_cleanly() {
    for n in 1..=64_usize {
        let value = n.to_string();
        let output = isolate::run_child_with("driver_entry_with_one_site_failing", &[(FAIL_SITE_ENV, &value)]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && stdout.contains("1 passed"), "site {n} failed:\n{stdout}");
        let outcome = stdout.lines().find_map(|l| l.split_once("site-outcome: ")).map(|(_, o)| o.to_owned());
        let outcome = outcome.expect("the child printed its outcome");
        if outcome.starts_with("failed=0") {
            // Fewer than n sites exist: every one has been failed.
            assert!(n > 1, "DriverEntry allocates, so at least one site fails: {outcome}");
            return;
        }
    }
    panic!("more than 64 allocation sites in one load and unload");
}

scenario! {
    /// A driver's statics cannot be re-initialised in one process: the model refuses a second load of the same
    /// image and says why.
    fn a_second_load_in_the_same_process_is_refused() {
        install_shunt_inf();
        let mut driver = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry).expect("first load");
        driver.unload(false).expect("unload");
        let second = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry);
        assert!(matches!(second, Err(LoadError::AlreadyLoadedInProcess)));
    }
}

/// Two load/unload cycles run in two processes, each with a fresh image.
#[test]
fn two_load_unload_cycles_run_in_two_processes() {
    let test = "driver_entry_registers_starts_and_unloads_cleanly";
    let runs: Vec<_> = (0..2).map(|_| isolate::run_child(test)).collect();
    let mut pids = Vec::new();
    for output in &runs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && stdout.contains("1 passed"), "cycle failed:\n{stdout}");
        pids.push(isolate::child_pid(output).expect("the child printed its pid"));
    }
    assert_ne!(pids[0], pids[1], "each cycle had its own process");
    assert!(!pids.contains(&std::process::id()));
}

scenario! {
    /// Filter Manager offers every volume to the started filter: Shunt attaches to local disk file systems and
    /// declines the network redirector; a volume mounted later is offered too; a manual detach is allowed while
    /// nothing is redirected; unload tears the remaining instances down.
    fn instances_attach_to_disk_volumes_and_are_torn_down_at_unload() {
        use fltsim::{
            fltmgr::instance::{self, InstanceRecord},
            io::{self, VolumeSpec},
        };
        use windows_sys::{
            Wdk::Storage::FileSystem::Minifilters::{
                FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD, FLTFL_INSTANCE_TEARDOWN_MANUAL,
            },
            Win32::{
                Foundation::STATUS_FLT_DO_NOT_ATTACH,
                Storage::InstallableFileSystems::{FLT_FSTYPE_FAT, FLT_FSTYPE_LANMAN, FLT_FSTYPE_REFS},
                System::Ioctl::FILE_DEVICE_NETWORK_FILE_SYSTEM,
            },
        };

        let root = std::env::temp_dir();
        let c = io::mount(VolumeSpec::ntfs('C', &root));
        let f = io::mount(VolumeSpec { file_system: FLT_FSTYPE_FAT, ..VolumeSpec::ntfs('F', &root) });
        let n = io::mount(VolumeSpec {
            device_type: FILE_DEVICE_NETWORK_FILE_SYSTEM,
            file_system: FLT_FSTYPE_LANMAN,
            ..VolumeSpec::ntfs('N', &root)
        });
        install_shunt_inf();
        let mut driver = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry).expect("load");
        let on = |volume: &io::Volume| -> Option<InstanceRecord> {
            instance::instances().into_iter().find(|i| i.volume == volume.handle)
        };
        assert!(on(&c).is_some_and(|i| i.attached && i.altitude == shunt::ALTITUDE));
        assert!(on(&f).is_some_and(|i| i.attached));
        assert!(on(&n).is_some_and(|i| !i.attached && i.setup_status == STATUS_FLT_DO_NOT_ATTACH));

        let r = io::mount(VolumeSpec { file_system: FLT_FSTYPE_REFS, ..VolumeSpec::ntfs('R', &root) });
        assert!(on(&r).is_some_and(|i| i.attached), "a newly mounted volume is offered to the started filter");

        let filter = driver.filters()[0].handle;
        instance::detach(filter, f.handle).expect("Shunt allows a manual detach while nothing is redirected");
        assert_eq!(on(&f).and_then(|i| i.teardown_reason), Some(FLTFL_INSTANCE_TEARDOWN_MANUAL));

        driver.unload(false).expect("unload");
        for volume in [&c, &r] {
            let record = on(volume).expect("instance");
            assert!(!record.attached);
            assert_eq!(record.teardown_reason, Some(FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD));
        }
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

scenario! {
    /// With Shunt loaded and no policy, a program's create, read, write and close pass through Shunt to the file
    /// system unchanged, and Shunt breaks no rule on the way.
    fn file_access_passes_through_shunt_untouched() {
        use fltsim::io::{self, VolumeSpec, iomgr};
        use windows_sys::Win32::{
            Foundation::STATUS_OBJECT_NAME_NOT_FOUND,
            Storage::FileSystem::{FILE_READ_DATA, FILE_WRITE_DATA},
        };

        let root = std::env::temp_dir().join(format!("shunt-seam-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("Apps")).expect("volume root");
        std::fs::write(root.join("Apps").join("settings.ini"), b"[legacy]\nmode=1\n").expect("seed file");
        io::mount(VolumeSpec::ntfs('C', &root));
        install_shunt_inf();
        let mut driver = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry).expect("load");

        let params = iomgr::OpenParams { desired_access: FILE_READ_DATA | FILE_WRITE_DATA, ..Default::default() };
        let handle = iomgr::create(r"C:\apps\SETTINGS.ini", &params).expect("open through Shunt");
        assert_eq!(iomgr::read(&handle, None, 64).expect("read"), b"[legacy]\nmode=1\n");
        iomgr::write(&handle, Some(14), b"2").expect("write");
        iomgr::close(handle);
        assert_eq!(std::fs::read(root.join("Apps").join("settings.ini")).expect("host"), b"[legacy]\nmode=2\n");
        assert_eq!(iomgr::create(r"C:\apps\missing.ini", &params), Err(STATUS_OBJECT_NAME_NOT_FOUND));

        driver.unload(false).expect("unload");
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}

scenario! {
    /// Shunt under the test filters of the fltsim issue: a filter above that pends creates and replays them from a
    /// system worker, and one that reads at APC_LEVEL, in a guarded region and with a top-level IRP set. Shunt
    /// breaks no rule in any of those contexts.
    fn shunt_survives_the_contexts_filters_above_it_create() {
        use fltsim::{
            io::{self, VolumeSpec, iomgr},
            testfilters::{context_reader, poster},
        };

        let root = std::env::temp_dir().join(format!("shunt-contexts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("volume root");
        std::fs::write(root.join("data.txt"), b"context").expect("seed");
        io::mount(VolumeSpec::ntfs('C', &root));
        install_shunt_inf();
        let mut shunt = fltsim::load(shunt::SERVICE_NAME, shunt::DriverEntry).expect("shunt");
        let mut reader = context_reader::load().expect("reader");
        let mut posting = poster::load().expect("poster");
        let handle = iomgr::create(r"C:\data.txt", &iomgr::OpenParams::default()).expect("open through all three");
        assert_eq!(poster::replayed(), 1);
        for context in [
            context_reader::Context::ApcLevel,
            context_reader::Context::GuardedRegion,
            context_reader::Context::TopLevelIrp,
        ] {
            assert_eq!(context_reader::read(0, 7, context).1, b"context", "{context:?}");
        }
        iomgr::close(handle);
        posting.unload(false).expect("unload");
        reader.unload(false).expect("unload");
        shunt.unload(false).expect("unload");
        let reports = verifier::take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}
