//! Checks the built `shunt.sys` of both architectures is a loadable Windows kernel driver: the properties the
//! kernel loader, HVCI and the driver-signing rules rely on. Fails (never skips) when a driver is missing.

use object::{
    LittleEndian as LE, Object, ObjectSection,
    pe::{
        IMAGE_DIRECTORY_ENTRY_BASERELOC, IMAGE_DIRECTORY_ENTRY_TLS, IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE,
        IMAGE_DLLCHARACTERISTICS_NX_COMPAT, IMAGE_NT_OPTIONAL_HDR64_MAGIC, IMAGE_SCN_MEM_EXECUTE, IMAGE_SCN_MEM_WRITE,
        IMAGE_SUBSYSTEM_NATIVE,
    },
    read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64},
};
use shunt_tests::{ARCHES, Arch, built_driver, driver_dir, pe_checksum, read_artifact, stored_checksum};

/// The modules a minifilter may import from.
const KERNEL_MODULES: [&str; 3] = ["ntoskrnl.exe", "fltmgr.sys", "hal.dll"];

/// File I/O through Zw*/Nt* enters the stack from the top and completes through an APC (ARCHITECTURE.md, data
/// path point 7): the shipped driver must not import any of it.
fn is_file_io_zw(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.starts_with("zw") || lower.starts_with("nt")) && lower.contains("file")
}

fn imports(file: &PeFile64<'_>) -> Vec<(String, String)> {
    file.imports()
        .expect("import table")
        .iter()
        .map(|i| (String::from_utf8_lossy(i.library()).into_owned(), String::from_utf8_lossy(i.name()).into_owned()))
        .collect()
}

/// The RVA of `DriverEntry` according to the linker map written next to the driver.
fn driver_entry_rva(arch: &Arch, image_base: u64) -> u32 {
    let map = read_artifact(&driver_dir(arch).join("shunt.map"), "cargo xtask build-driver");
    let map = String::from_utf8_lossy(&map);
    let line = map
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("DriverEntry"))
        .unwrap_or_else(|| panic!("{}: the linker map has no DriverEntry", arch.name));
    let va = u64::from_str_radix(line.split_whitespace().nth(2).expect("Rva+Base column"), 16).expect("hex address");
    u32::try_from(va - image_base).expect("RVA fits in 32 bits")
}

fn check(arch: &Arch) {
    let data = built_driver(arch);
    let file = PeFile64::parse(&*data).unwrap_or_else(|e| panic!("{}: not a PE32+ image: {e}", arch.name));
    let nt = file.nt_headers();
    let optional = nt.optional_header();
    let name = arch.name;

    assert_eq!(optional.magic(), IMAGE_NT_OPTIONAL_HDR64_MAGIC, "{name}: PE32+");
    assert_eq!(nt.file_header().machine.get(LE), arch.machine, "{name}: machine");
    assert_eq!(optional.subsystem(), IMAGE_SUBSYSTEM_NATIVE, "{name}: subsystem NATIVE");
    assert_eq!(
        optional.address_of_entry_point(),
        driver_entry_rva(arch, optional.image_base()),
        "{name}: the entry point is DriverEntry"
    );

    let imports = imports(&file);
    assert!(!imports.is_empty(), "{name}: a driver that imports nothing is not this driver");
    for (module, function) in &imports {
        assert!(
            KERNEL_MODULES.iter().any(|m| m.eq_ignore_ascii_case(module)),
            "{name}: imports {function} from {module}, not a kernel module"
        );
        assert!(!is_file_io_zw(function), "{name}: imports the file-I/O routine {function}");
        assert_ne!(function, "KeGetCurrentIrql", "{name}: the IRQL is read inline, never imported");
    }
    for required in ["FltRegisterFilter", "FltStartFiltering", "FltUnregisterFilter"] {
        assert!(imports.iter().any(|(m, f)| m == "fltmgr.sys" && f == required), "{name}: imports {required}");
    }

    let directories = file.data_directories();
    let relocations = directories.get(IMAGE_DIRECTORY_ENTRY_BASERELOC).map_or(0, |d| d.size.get(LE));
    assert!(relocations > 0, "{name}: has base relocations");
    let tls = directories.get(IMAGE_DIRECTORY_ENTRY_TLS).map_or(0, |d| d.size.get(LE));
    assert_eq!(tls, 0, "{name}: has no TLS directory (kernel images cannot have one)");
    let characteristics = optional.dll_characteristics();
    assert_ne!(characteristics & IMAGE_DLLCHARACTERISTICS_NX_COMPAT, 0, "{name}: NX-compatible");
    assert_ne!(characteristics & IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE, 0, "{name}: relocatable (dynamic base)");

    assert_ne!(stored_checksum(&data), 0, "{name}: has a PE checksum");
    assert_eq!(stored_checksum(&data), pe_checksum(&data), "{name}: the PE checksum is valid");

    for section in file.sections() {
        let flags = match section.flags() {
            object::SectionFlags::Coff { characteristics } => characteristics,
            other => panic!("{name}: unexpected section flags {other:?}"),
        };
        let section_name = section.name().unwrap_or("?");
        assert!(
            flags & IMAGE_SCN_MEM_WRITE == 0 || flags & IMAGE_SCN_MEM_EXECUTE == 0,
            "{name}: section {section_name} is both writable and executable"
        );
    }
}

#[test]
fn x64_driver_is_a_loadable_kernel_image() {
    check(&ARCHES[0]);
}

#[test]
fn arm64_driver_is_a_loadable_kernel_image() {
    check(&ARCHES[1]);
}

/// The IRQL is read inline, as the WDK headers do: `mov r64, cr8` on x64 and a byte load from the KPCR at
/// `[x18, #0x38]` on ARM64 must be in the code.
#[test]
fn irql_is_read_inline_on_both_architectures() {
    let text = |arch: &Arch| {
        let data = built_driver(arch);
        let file = PeFile64::parse(&*data).expect("PE");
        file.section_by_name(".text").expect(".text").data().expect("code").to_vec()
    };
    let x64 = text(&ARCHES[0]);
    // REX with R set (CR8 is control register 8), 0F 20 (mov r64, CRn), ModRM with mod = 11 and reg = 000.
    let has_mov_cr8 =
        x64.windows(4).any(|w| w[0] & 0xF4 == 0x44 && w[1] == 0x0F && w[2] == 0x20 && w[3] & 0xF8 == 0xC0);
    assert!(has_mov_cr8, "x64: no `mov r64, cr8` in .text");
    let arm64 = text(&ARCHES[1]);
    // LDRB Wt, [X18, #0x38]: 0x39400000 | imm12 << 10 | Rn << 5 | Rt with imm12 = 0x38, Rn = 18.
    let has_ldrb = arm64
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .any(|insn| insn & 0xFFFF_FFE0 == 0x3940_E240);
    assert!(has_ldrb, "arm64: no `ldrb wN, [x18, #0x38]` in .text");
}

/// The checks themselves are not vacuous: a corrupted checksum and a writable code section are caught.
#[test]
fn checksum_check_catches_a_changed_image() {
    let mut data = built_driver(&ARCHES[0]);
    let last = data.len() - 1;
    data[last] ^= 0xFF;
    assert_ne!(stored_checksum(&data), pe_checksum(&data));
}
