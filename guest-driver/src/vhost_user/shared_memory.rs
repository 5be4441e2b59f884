//! Memory a vhost-user device can reach: a memfd mapped `MAP_SHARED`, so the device maps the same
//! pages from the descriptor the frontend hands over with `VHOST_USER_ADD_MEM_REG`.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use zeroize::Zeroize;

pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
    file: File,
}

// SAFETY: the mapping is owned by this value alone; moving it to another thread moves the only
// handle to it. (The device writes into it only while a request is in flight, which the owner
// waits for through `&mut self`.)
unsafe impl Send for SharedMemory {}

impl SharedMemory {
    /// A zero-filled shared mapping of `len` bytes (`len` > 0).
    pub fn new(name: &CStr, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty shared mapping",
            ));
        }
        // SAFETY: `name` is a valid NUL-terminated string that memfd_create only reads.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(u64::try_from(len).unwrap_or(u64::MAX))?;
        // SAFETY: a new mapping at an address the kernel chooses, of a file this value owns and
        // that was sized to `len` above; no Rust reference aliases it yet.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len, file })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` writable bytes for as long as `self` lives, and `&mut self`
        // makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The process address of the mapping (what vhost-user uses as the device address).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // Fragment bytes passed through here.
        self.as_mut_slice().zeroize();
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no slice of it can
        // outlive `self`. A failure leaves the mapping in place, which is harmless.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_shared_with_whoever_maps_the_fd() {
        let mut memory = SharedMemory::new(c"test", 8192).unwrap();
        assert_eq!(memory.len(), 8192);
        assert_eq!(memory.addr() % 4096, 0);
        assert!(memory.as_slice().iter().all(|b| *b == 0));
        memory.as_mut_slice()[4096..4100].copy_from_slice(b"KSHV");
        // Reading through the descriptor sees the bytes written through the mapping: this is
        // what the device relies on.
        let mut seen = [0u8; 4];
        let path = format!("/proc/self/fd/{}", memory.fd());
        let file = File::open(path).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut seen, 4096).unwrap();
        assert_eq!(&seen, b"KSHV");
    }

    #[test]
    fn an_empty_mapping_is_refused() {
        assert!(SharedMemory::new(c"test", 0).is_err());
    }
}
