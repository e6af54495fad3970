//! The kernel runtime of the Windows build: the panic handler and the global allocator.
//!
//! Both exist only when the crate is built for Windows (as `shunt.sys`); on other hosts the standard library
//! provides them and the driver's explicit pool allocations reach fltsim through `ExAllocatePool2`.

/// The bugcheck code `shunt.sys` raises when Rust code panics ("SHNT"). A panic is a bug in the driver: kernel code
/// is written not to panic, and the lints forbid the usual ways to. Parameters: 1 = [`BUGCHECK_PANIC`],
/// 2 = the source line, 3 = the source column, 4 = reserved (0).
pub const BUGCHECK_CODE: u32 = u32::from_be_bytes(*b"SHNT");

/// First bugcheck parameter: a Rust panic.
pub const BUGCHECK_PANIC: usize = 1;

#[cfg(all(windows, not(test)))]
mod kernel {
    use core::{alloc::GlobalAlloc, alloc::Layout, panic::PanicInfo, ptr::null_mut};

    use windows_sys::Wdk::System::SystemServices::{ExAllocatePool2, ExFreePoolWithTag, KeBugCheckEx};

    use super::{BUGCHECK_CODE, BUGCHECK_PANIC};
    use crate::wdk::pool::{POOL_ALIGNMENT, flags, tags};

    /// Bugchecks with [`BUGCHECK_CODE`]: the only safe end for a panic in kernel mode.
    #[panic_handler]
    fn panic(info: &PanicInfo<'_>) -> ! {
        let (line, column) = info.location().map_or((0, 0), |l| (l.line(), l.column()));
        let (line, column) = (usize::try_from(line).unwrap_or(0), usize::try_from(column).unwrap_or(0));
        // SAFETY: KeBugCheckEx takes plain values and never returns.
        unsafe { KeBugCheckEx(BUGCHECK_CODE, BUGCHECK_PANIC, line, column, 0) };
        // KeBugCheckEx does not return; windows-sys does not declare it `-> !`.
        loop {
            core::hint::spin_loop();
        }
    }

    /// The Rust global allocator over nonpaged pool, tagged [`tags::HEAP`].
    ///
    /// Collections allocate through it only with `try_reserve`, so exhaustion is an error, not a panic. Layouts
    /// aligned beyond the pool's 16 bytes are refused (a null return), which the driver never asks for.
    struct PoolAllocator;

    // SAFETY: ExAllocatePool2 returns memory aligned to POOL_ALIGNMENT that nothing else owns, or null;
    // ExFreePoolWithTag frees exactly such memory.
    unsafe impl GlobalAlloc for PoolAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if layout.align() > POOL_ALIGNMENT {
                return null_mut();
            }
            // SAFETY: valid flags and a non-zero size (GlobalAlloc's contract).
            unsafe { ExAllocatePool2(flags::NON_PAGED | flags::UNINITIALIZED, layout.size(), tags::HEAP.raw()) }.cast()
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if layout.align() > POOL_ALIGNMENT {
                return null_mut();
            }
            // SAFETY: as in `alloc`; without UNINITIALIZED the pool zeroes the memory.
            unsafe { ExAllocatePool2(flags::NON_PAGED, layout.size(), tags::HEAP.raw()) }.cast()
        }

        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc`/`alloc_zeroed` above, with this tag.
            unsafe { ExFreePoolWithTag(ptr.cast(), tags::HEAP.raw()) };
        }
    }

    #[global_allocator]
    static ALLOCATOR: PoolAllocator = PoolAllocator;
}
