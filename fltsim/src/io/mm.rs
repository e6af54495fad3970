//! The memory and cache managers, as far as a filter sees them: section creation, page faults on a mapped view, the
//! cache manager's faults while a file system serves cached I/O, and the mapped page writer.
//!
//! - [`create_section`] sends `IRP_MJ_ACQUIRE_FOR_SECTION_SYNCHRONIZATION` (`SyncTypeCreateSection`) through the
//!   filters, as creating a section does; a filter may refuse it, and then no section exists.
//! - A [`View`] faults pages in: each missing page is a paging read (`IRP_PAGING_IO | IRP_NOCACHE |
//!   IRP_SYNCHRONOUS_PAGING_IO`) issued in the faulting thread at APC_LEVEL with the top-level IRP NULL, as the
//!   memory manager does for a user's mapped view.
//! - With [`set_cache_faults`] on, a cached (buffered) read served by the model file system first faults the pages
//!   it reads into the cache: paging reads at APC_LEVEL in the same thread, with the top-level IRP set (to the
//!   outer operation), as the cache manager's copy does under the file system.
//! - [`View::flush`] is the mapped page writer: paging writes of the dirty pages from a system thread at APC_LEVEL
//!   with the top-level IRP set to `FSRTL_MOD_WRITE_TOP_LEVEL_IRP`.
//!
//! Paging I/O arrives at up to APC_LEVEL (FLTMGR-CONTRACTS.md, "Paging I/O";
//! <https://learn.microsoft.com/windows-hardware/drivers/ifs/dispatch-routine-irql-and-thread-context>). While a
//! thread services paging I/O, a filter that issues cached I/O is reported ([`crate::Rule::CachedIoFromPagingPath`]).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
};

use windows_sys::{
    Wdk::{
        Storage::FileSystem::{Minifilters::IRP_MJ_ACQUIRE_FOR_SECTION_SYNCHRONIZATION, SyncTypeCreateSection},
        System::SystemServices::{IRP_MJ_READ, IRP_MJ_WRITE, IRP_NOCACHE, IRP_PAGING_IO, IRP_SYNCHRONOUS_PAGING_IO},
    },
    Win32::Foundation::{NTSTATUS, STATUS_END_OF_FILE, STATUS_INVALID_PARAMETER, STATUS_SUCCESS},
};

use super::{fs, iomgr};
use crate::{
    fltmgr::dispatch::{Origin, Request, dispatch},
    kernel::{irql, thread},
};

/// The page size of the model (4 KiB, as on x64 and ARM64 Windows).
pub const PAGE_SIZE: u64 = 4096;

/// `FSRTL_CACHE_TOP_LEVEL_IRP`: the top-level IRP value while the cache manager (lazy writer, read-ahead) runs.
pub const FSRTL_CACHE_TOP_LEVEL_IRP: usize = 0x02;

/// `FSRTL_MOD_WRITE_TOP_LEVEL_IRP`: the top-level IRP value while the modified or mapped page writer runs.
pub const FSRTL_MOD_WRITE_TOP_LEVEL_IRP: usize = 0x03;

/// `PAGE_READONLY`.
const PAGE_READONLY: u32 = 0x02;

static CACHE_FAULTS: AtomicBool = AtomicBool::new(false);

/// Turns the cache manager's faults on cached reads on or off (off by default, so scenarios that do not study
/// paging see one read per read).
pub fn set_cache_faults(on: bool) {
    CACHE_FAULTS.store(on, Ordering::SeqCst);
}

/// Whether cached reads fault their pages in first.
#[must_use]
pub fn cache_faults() -> bool {
    CACHE_FAULTS.load(Ordering::SeqCst)
}

/// A section of a file, created through a handle.
#[derive(Debug)]
pub struct Section {
    handle: u64,
}

/// Creates a section for the file behind `handle`, as `CreateFileMapping` / `NtCreateSection` do: the filters
/// see `IRP_MJ_ACQUIRE_FOR_SECTION_SYNCHRONIZATION` with `SyncTypeCreateSection` and may fail it.
///
/// # Errors
/// The status a filter (or the file system) failed the synchronization with.
pub fn create_section(handle: &iomgr::Handle) -> Result<Section, NTSTATUS> {
    let (file_object, volume) = iomgr::file_object_and_volume(handle)?;
    let major = u8::try_from(IRP_MJ_ACQUIRE_FOR_SECTION_SYNCHRONIZATION & 0xFF).unwrap_or(u8::MAX);
    let mut request = Request::new(major, file_object, false).fs_filter_operation();
    {
        let iopb = request.iopb();
        iopb.Parameters.AcquireForSectionSynchronization.SyncType = SyncTypeCreateSection;
        iopb.Parameters.AcquireForSectionSynchronization.PageProtection = PAGE_READONLY;
    }
    dispatch(volume.handle, &mut request, |request| request.complete(STATUS_SUCCESS, 0));
    let status = request.status();
    if status < 0 {
        return Err(status);
    }
    iomgr::mark_section(handle);
    Ok(Section { handle: handle.id() })
}

/// A mapped view of a section.
#[derive(Debug)]
pub struct View {
    handle: u64,
    pages: BTreeMap<u64, (Vec<u8>, bool)>,
}

/// Maps a view of `section`.
#[must_use]
pub fn map_view(section: &Section) -> View {
    View { handle: section.handle, pages: BTreeMap::new() }
}

/// Issues one paging I/O for `page` of the file behind `handle`, in the current thread, at `level`, with the
/// top-level IRP `top_level`: a read fills `buffer` from the file, a write writes it.
fn paging_io(
    handle: &iomgr::Handle,
    write: bool,
    page: u64,
    buffer: &mut Vec<u8>,
    level: u8,
    top_level: usize,
) -> Result<usize, NTSTATUS> {
    let (file_object, volume) = iomgr::file_object_and_volume(handle)?;
    let open = iomgr::open_of(handle)?;
    let offset = page.checked_mul(PAGE_SIZE).ok_or(STATUS_INVALID_PARAMETER)?;
    let code = if write { IRP_MJ_WRITE } else { IRP_MJ_READ };
    let mut request = Request::new(u8::try_from(code).unwrap_or(0), file_object, true).from_origin(Origin::default());
    let length = u32::try_from(buffer.len()).map_err(|_| STATUS_INVALID_PARAMETER)?;
    {
        let iopb = request.iopb();
        iopb.IrpFlags = IRP_PAGING_IO | IRP_NOCACHE | IRP_SYNCHRONOUS_PAGING_IO;
        if write {
            iopb.Parameters.Write.Length = length;
            iopb.Parameters.Write.ByteOffset = i64::try_from(offset).map_err(|_| STATUS_INVALID_PARAMETER)?;
            iopb.Parameters.Write.WriteBuffer = buffer.as_mut_ptr().cast();
        } else {
            iopb.Parameters.Read.Length = length;
            iopb.Parameters.Read.ByteOffset = i64::try_from(offset).map_err(|_| STATUS_INVALID_PARAMETER)?;
            iopb.Parameters.Read.ReadBuffer = buffer.as_mut_ptr().cast();
        }
    }
    let mut data = std::mem::take(buffer);
    thread::with_top_level_irp(top_level, || {
        thread::at_irql(level, || {
            dispatch(volume.handle, &mut request, |request| {
                let result = if write {
                    // Paging writes do not extend the file: the part past the end of file is dropped.
                    let size = fs::end_of_file(open).unwrap_or(0);
                    let keep = usize::try_from(size.saturating_sub(offset)).unwrap_or(usize::MAX).min(data.len());
                    if keep == 0 { Ok(0) } else { fs::write(open, Some(offset), &data[..keep]) }
                } else {
                    fs::read(open, offset, data.len()).map(|read| {
                        let n = read.len();
                        data[..n].copy_from_slice(&read);
                        data[n..].fill(0);
                        n
                    })
                };
                match result {
                    Ok(n) => request.complete(STATUS_SUCCESS, n),
                    Err(status) => request.complete(status, 0),
                }
            });
        });
    });
    *buffer = data;
    let status = request.status();
    if status < 0 { Err(status) } else { Ok(request.information()) }
}

impl View {
    fn handle(&self) -> iomgr::Handle {
        iomgr::Handle::from_id(self.handle)
    }

    fn fault(&mut self, page: u64) -> Result<(), NTSTATUS> {
        if self.pages.contains_key(&page) {
            return Ok(());
        }
        let mut buffer = vec![0u8; usize::try_from(PAGE_SIZE).unwrap_or(4096)];
        paging_io(&self.handle(), false, page, &mut buffer, irql::APC, 0)?;
        self.pages.insert(page, (buffer, false));
        Ok(())
    }

    /// Reads `length` bytes at `offset` through the view, faulting in each page not yet resident.
    ///
    /// # Errors
    /// The paging read's status (a page entirely past the end of file: `STATUS_END_OF_FILE`, an access violation
    /// for a real program).
    pub fn read(&mut self, offset: u64, length: usize) -> Result<Vec<u8>, NTSTATUS> {
        let mut out = Vec::with_capacity(length);
        let mut at = offset;
        let end = offset.saturating_add(u64::try_from(length).unwrap_or(u64::MAX));
        while at < end {
            let page = at / PAGE_SIZE;
            self.fault(page)?;
            let within = usize::try_from(at % PAGE_SIZE).unwrap_or(0);
            let take = usize::try_from((PAGE_SIZE - at % PAGE_SIZE).min(end - at)).unwrap_or(0);
            let (data, _) = self.pages.get(&page).ok_or(STATUS_END_OF_FILE)?;
            out.extend_from_slice(&data[within..within + take]);
            at += u64::try_from(take).unwrap_or(PAGE_SIZE);
        }
        Ok(out)
    }

    /// Writes through the view: the pages become dirty and reach the file when the mapped page writer runs.
    ///
    /// # Errors
    /// The paging read's status when a page must be faulted in first.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NTSTATUS> {
        for (i, byte) in data.iter().enumerate() {
            let at = offset.saturating_add(u64::try_from(i).unwrap_or(u64::MAX));
            let page = at / PAGE_SIZE;
            self.fault(page)?;
            if let Some((bytes, dirty)) = self.pages.get_mut(&page) {
                bytes[usize::try_from(at % PAGE_SIZE).unwrap_or(0)] = *byte;
                *dirty = true;
            }
        }
        Ok(())
    }

    /// The mapped page writer: writes every dirty page back with paging writes from a system thread at
    /// APC_LEVEL, top-level IRP `FSRTL_MOD_WRITE_TOP_LEVEL_IRP`.
    ///
    /// # Errors
    /// The first paging write that failed.
    pub fn flush(&mut self) -> Result<(), NTSTATUS> {
        let handle = self.handle;
        let dirty: Vec<(u64, Vec<u8>)> =
            self.pages.iter().filter(|(_, (_, d))| *d).map(|(p, (b, _))| (*p, b.clone())).collect();
        let result = thread::run_on_system_thread("System: MappedPageWriter", move || {
            for (page, mut bytes) in dirty {
                paging_io(
                    &iomgr::Handle::from_id(handle),
                    true,
                    page,
                    &mut bytes,
                    irql::APC,
                    FSRTL_MOD_WRITE_TOP_LEVEL_IRP,
                )?;
            }
            Ok(())
        })
        .unwrap_or(Err(STATUS_INVALID_PARAMETER));
        if result.is_ok() {
            for (_, dirty) in self.pages.values_mut() {
                *dirty = false;
            }
        }
        result
    }
}

/// The cache manager's faults for a cached read of `length` bytes at `offset` on `handle`, issued from inside the
/// file system's processing of the read whose callback data is `outer` (the top-level IRP).
pub(crate) fn fault_for_cached_read(handle: &iomgr::Handle, offset: u64, length: usize, outer: usize) {
    if !cache_faults() || length == 0 {
        return;
    }
    let first = offset / PAGE_SIZE;
    let last = offset.saturating_add(u64::try_from(length).unwrap_or(u64::MAX)).saturating_sub(1) / PAGE_SIZE;
    for page in first..=last {
        let mut buffer = vec![0u8; usize::try_from(PAGE_SIZE).unwrap_or(4096)];
        if paging_io(handle, false, page, &mut buffer, irql::APC, outer).is_err() {
            break;
        }
    }
}
