//! Import coverage: every kernel routine the built `shunt.sys` imports is exported by fltsim, so the driver's real
//! code can run against the model. The check reads the model's exports from its cdylib the way a loader would,
//! and the model's documented export table, and fails naming every import either lacks.

use std::{collections::BTreeSet, env, fs, path::PathBuf};

use fltsim::exports::{COMPILER_SUPPORT, EXPORTS};
use object::{Object, ObjectSymbol, read::pe::PeFile64};
use shunt_tests::{ARCHES, built_driver};

/// The imports of both built drivers, by name.
fn driver_imports() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for arch in &ARCHES {
        let data = built_driver(arch);
        let file = PeFile64::parse(&*data).expect("PE");
        for import in file.imports().expect("import table") {
            names.insert(String::from_utf8_lossy(import.name()).into_owned());
        }
    }
    names
}

/// The dynamic symbols fltsim's cdylib exports (it is built beside this test binary).
fn model_exports() -> BTreeSet<String> {
    let exe = env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    let candidates: Vec<PathBuf> = [deps.to_path_buf(), deps.join("..")]
        .iter()
        .flat_map(|d| ["libfltsim.so", "libfltsim.dylib", "fltsim.dll"].map(|n| d.join(n)))
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("fltsim's cdylib is not built; looked at {candidates:?}"));
    let data = fs::read(path).expect("read fltsim cdylib");
    let file = object::File::parse(&*data).expect("parse fltsim cdylib");
    file.dynamic_symbols()
        .filter(|s| s.is_definition() && s.is_global())
        .filter_map(|s| s.name().ok().map(ToOwned::to_owned))
        .collect()
}

#[test]
fn fltsim_exports_every_import_of_shunt_sys() {
    let imports = driver_imports();
    let exported = model_exports();
    let documented: BTreeSet<&str> = EXPORTS.iter().map(|e| e.name).collect();
    let mut missing = Vec::new();
    for name in &imports {
        if COMPILER_SUPPORT.contains(&name.as_str()) {
            continue;
        }
        if !exported.contains(name) {
            missing.push(format!("{name} (not exported by fltsim)"));
        } else if !documented.contains(name.as_str()) {
            missing.push(format!("{name} (exported but missing from fltsim::exports::EXPORTS)"));
        }
    }
    assert!(missing.is_empty(), "shunt.sys imports routines fltsim does not model:\n  {}", missing.join("\n  "));
    println!("shunt.sys imports: {}", imports.iter().cloned().collect::<Vec<_>>().join(", "));
}

/// Every row of the export table is a symbol the model really exports, and the README lists every row.
#[test]
fn export_table_matches_the_model_and_its_readme() {
    let exported = model_exports();
    let readme = fs::read_to_string(shunt_tests::workspace_root().join("fltsim/README.md")).expect("fltsim/README.md");
    for export in EXPORTS {
        assert!(exported.contains(export.name), "EXPORTS lists {} but fltsim does not export it", export.name);
        assert!(readme.contains(&format!("`{}`", export.name)), "fltsim/README.md does not list `{}`", export.name);
        assert!(readme.contains(export.docs), "fltsim/README.md does not cite {} for {}", export.docs, export.name);
    }
}

/// The coverage check is not vacuous: a name fltsim does not export is seen as missing.
#[test]
fn an_unmodelled_import_would_be_caught() {
    let exported = model_exports();
    assert!(exported.contains("FltRegisterFilter"));
    let unmodelled = "ShuntNoSuchKernelRoutine";
    assert!(!exported.contains(unmodelled), "the symbol reader reports names fltsim does not export");
}
