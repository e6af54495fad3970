//! The registry model: keys and values under `\REGISTRY\MACHINE`, seeded by installing a driver's INF.
//!
//! Key paths compare case-insensitively, as registry paths do. The simulated Windows build decides where Filter
//! Manager reads a minifilter's instances: directly under the service key before Windows 11 24H2 (build 26100),
//! under `Parameters` from 24H2 on (<https://learn.microsoft.com/windows-hardware/drivers/ifs/creating-an-inf-file-for-a-minifilter-driver>).
//! The model reads only the location of its build; whether 24H2 still falls back to the old location is not
//! documented, so the model does not, which is the stricter choice.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use crate::inf::{Inf, InfError, RegValue};

/// The root of every service key.
pub const SERVICES: &str = r"\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services";

/// The first build of Windows 11 24H2, from which Filter Manager reads `Parameters\Instances`.
pub const BUILD_24H2: u32 = 26100;

/// A registry key: its name as written and its values.
#[derive(Clone, Debug, Default)]
pub struct Key {
    /// The full path as first written.
    pub path: String,
    /// Values by lower-cased name: (name as written, value).
    pub values: BTreeMap<String, (String, RegValue)>,
}

struct Registry {
    keys: BTreeMap<String, Key>,
    build: u32,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard: MutexGuard<'_, Option<Registry>> = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    f(guard.get_or_insert_with(|| Registry { keys: BTreeMap::new(), build: BUILD_24H2 }))
}

fn normalize(path: &str) -> String {
    path.trim_end_matches('\\').to_ascii_lowercase()
}

/// The simulated Windows build number (default: 26100, Windows 11 24H2).
#[must_use]
pub fn windows_build() -> u32 {
    with_registry(|r| r.build)
}

/// Sets the simulated Windows build number.
pub fn set_windows_build(build: u32) {
    with_registry(|r| r.build = build);
}

/// Creates `path` and its parents if missing.
pub fn create_key(path: &str) {
    with_registry(|r| {
        let mut prefix = String::new();
        for (i, part) in path.trim_end_matches('\\').split('\\').enumerate() {
            if i > 0 {
                prefix.push('\\');
            }
            prefix.push_str(part);
            if part.is_empty() {
                continue;
            }
            r.keys.entry(normalize(&prefix)).or_insert_with(|| Key { path: prefix.clone(), values: BTreeMap::new() });
        }
    });
}

/// Sets `name` under `path`, creating the key.
pub fn set_value(path: &str, name: &str, value: RegValue) {
    create_key(path);
    with_registry(|r| {
        if let Some(key) = r.keys.get_mut(&normalize(path)) {
            key.values.insert(name.to_ascii_lowercase(), (name.to_owned(), value));
        }
    });
}

/// Deletes `path` and every key below it; returns whether anything was deleted.
#[must_use = "a test that deletes a key usually means it to exist"]
pub fn delete_tree(path: &str) -> bool {
    let target = normalize(path);
    let below = format!("{target}\\");
    with_registry(|r| {
        let before = r.keys.len();
        r.keys.retain(|k, _| k != &target && !k.starts_with(&below));
        r.keys.len() != before
    })
}

/// The key at `path`, if it exists.
#[must_use]
pub fn key(path: &str) -> Option<Key> {
    with_registry(|r| r.keys.get(&normalize(path)).cloned())
}

/// The value `name` under `path`.
#[must_use]
pub fn value(path: &str, name: &str) -> Option<RegValue> {
    key(path)?.values.get(&name.to_ascii_lowercase()).map(|(_, v)| v.clone())
}

/// The names of the direct subkeys of `path`, as written.
#[must_use]
pub fn subkeys(path: &str) -> Vec<String> {
    let prefix = format!("{}\\", normalize(path));
    with_registry(|r| {
        r.keys
            .iter()
            .filter_map(|(k, key)| {
                let rest = k.strip_prefix(&prefix)?;
                (!rest.contains('\\')).then(|| key.path.rsplit('\\').next().unwrap_or_default().to_owned())
            })
            .collect()
    })
}

/// The service key of `service`.
#[must_use]
pub fn service_key(service: &str) -> String {
    format!(r"{SERVICES}\{service}")
}

/// Where Filter Manager reads the instances of `service` on the simulated build.
#[must_use]
pub fn instances_key(service: &str) -> String {
    if windows_build() >= BUILD_24H2 {
        format!(r"{}\Parameters\Instances", service_key(service))
    } else {
        format!(r"{}\Instances", service_key(service))
    }
}

/// Installs the service an INF describes, as the simulated build on `arch` would: the service key's values and
/// every `HKR` value of its `AddReg` sections. Returns the service name.
///
/// # Errors
/// The INF could not be parsed or does not describe a service install for `arch`.
pub fn install_inf(text: &str, arch: &str) -> Result<String, InfError> {
    let inf = Inf::parse(text)?;
    let install = inf.install_service(arch, windows_build())?;
    let root = service_key(&install.name);
    create_key(&root);
    for (name, value) in &install.service_values {
        set_value(&root, name, value.clone());
    }
    for (subkey, name, value) in install.values {
        let path = if subkey.is_empty() { root.clone() } else { format!(r"{root}\{subkey}") };
        if name.is_empty() {
            create_key(&path);
        } else {
            set_value(&path, &name, value);
        }
    }
    Ok(install.name)
}

/// Writes what a minifilter INF would for `service`: the service key and one instance at `altitude`, under the
/// instances key the simulated build reads. For small test filters that have no INF of their own.
pub fn install_minifilter_service(service: &str, instance: &str, altitude: &str) {
    let root = service_key(service);
    set_value(&root, "Type", RegValue::Dword(2));
    set_value(&root, "Start", RegValue::Dword(3));
    let instances = instances_key(service);
    set_value(&instances, "DefaultInstance", RegValue::Sz(instance.to_owned()));
    let path = format!(r"{instances}\{instance}");
    set_value(&path, "Altitude", RegValue::Sz(altitude.to_owned()));
    set_value(&path, "Flags", RegValue::Dword(0));
}
