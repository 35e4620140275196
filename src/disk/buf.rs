//! Page-aligned I/O buffers (O_DIRECT needs them) and a small per-connection pool, so a busy
//! connection does not mmap/munmap a megabyte for every request.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// The buffer owns its memory exclusively.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes (capacity rounded up to a power of two, at least one page).
    pub fn new(len: usize) -> Self {
        Self::alloc(len, false)
    }

    pub fn zeroed(len: usize) -> Self {
        Self::alloc(len, true)
    }

    fn alloc(len: usize, zero: bool) -> Self {
        let cap = len.max(ALIGN).next_power_of_two();
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
        let raw = unsafe {
            if zero {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Reuse the buffer for `len` bytes; `len` must fit the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap);
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

/// Free buffers kept for reuse, by power-of-two capacity, up to a byte budget.
pub struct BufPool {
    free: Vec<Vec<AlignedBuf>>,
    cached: usize,
    budget: usize,
}

impl BufPool {
    pub fn new(budget: usize) -> Self {
        BufPool {
            free: (0..usize::BITS).map(|_| Vec::new()).collect(),
            cached: 0,
            budget,
        }
    }

    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let cap = len.max(ALIGN).next_power_of_two();
        match self.free[cap.trailing_zeros() as usize].pop() {
            Some(mut b) => {
                self.cached -= b.capacity();
                b.set_len(len);
                b
            }
            None => AlignedBuf::new(len),
        }
    }

    pub fn put(&mut self, buf: AlignedBuf) {
        if self.cached + buf.capacity() <= self.budget {
            self.cached += buf.capacity();
            self.free[buf.capacity().trailing_zeros() as usize].push(buf);
        }
    }
}

/// `n` rounded up to a whole number of [`ALIGN`] blocks.
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Immutable bytes in block-aligned memory, followed by zeroes up to the next block: what a
/// direct-I/O write of whole blocks needs. Cheap to clone; [`BlockBytes::to_bytes`] gives a
/// `Bytes` over the same memory.
#[derive(Clone)]
pub struct BlockBytes {
    buf: std::sync::Arc<AlignedBuf>,
    len: usize,
}

impl BlockBytes {
    /// The first `len` bytes of `buf`; the rest of the block they end in is zeroed.
    pub fn new(mut buf: AlignedBuf, len: usize) -> Self {
        let padded = align_up(len);
        assert!(padded <= buf.capacity());
        buf.set_len(padded);
        buf[len..].fill(0);
        BlockBytes {
            buf: std::sync::Arc::new(buf),
            len,
        }
    }

    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut buf = AlignedBuf::new(align_up(bytes.len()));
        buf.set_len(bytes.len());
        buf.copy_from_slice(bytes);
        Self::new(buf, bytes.len())
    }

    /// The bytes and their zero padding: a whole number of blocks.
    pub fn padded(&self) -> &[u8] {
        &self.buf
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self.clone())
    }
}

impl std::fmt::Debug for BlockBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockBytes({} bytes)", self.len)
    }
}

impl AsRef<[u8]> for BlockBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_reused() {
        let mut pool = BufPool::new(1 << 20);
        let b = pool.get(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!((b.len(), b.capacity()), (5000, 8192));
        let p = b.as_ptr();
        pool.put(b);
        let b2 = pool.get(8000);
        assert_eq!(b2.as_ptr(), p, "same capacity class is reused");
        assert!(AlignedBuf::zeroed(100).iter().all(|&x| x == 0));
    }

    #[test]
    fn block_bytes_are_aligned_and_zero_padded() {
        let b = BlockBytes::copy_from(&[7u8; 5000]);
        assert_eq!(&b[..], &[7u8; 5000][..]);
        assert_eq!(b.padded().len(), 8192);
        assert_eq!(b.padded().as_ptr() as usize % ALIGN, 0);
        assert!(b.padded()[5000..].iter().all(|&x| x == 0));
        let shared = b.to_bytes();
        assert_eq!(shared.as_ptr(), b.as_ptr(), "no copy");
        assert_eq!(BlockBytes::copy_from(&[]).padded().len(), 0);
    }

    #[test]
    fn pool_respects_budget() {
        let mut pool = BufPool::new(8192);
        pool.put(AlignedBuf::new(8192));
        pool.put(AlignedBuf::new(8192));
        assert_eq!(pool.cached, 8192);
    }
}
