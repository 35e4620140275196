//! Page-aligned I/O buffers (O_DIRECT needs them) and a small per-connection pool, so a busy
//! connection does not mmap/munmap a megabyte for every request.
//!
//! Buffers of 2 MiB and more, and the 1 MiB ones a pool hands out, live in transparent huge
//! pages. A direct-I/O write pins its buffer page by page, and this machine's disk queue takes
//! at most 254 memory segments per request: from 4 KiB pages a 1 MiB write is two requests and
//! an 8 MiB redo batch is 33, from 2 MiB pages each is one or two. Sequential replication went from about 700 to 900 MiB/s
//! (docs/TUNING.md, seventh session).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

pub const ALIGN: usize = 4096;
/// A transparent huge page.
const HUGE: usize = 2 << 20;
/// Buffers from this capacity on are backed by huge pages: below 2 MiB, as pieces of a shared
/// huge page that a [`BufPool`] hands out one by one.
const HUGE_FROM: usize = 1 << 20;

/// Where a buffer's memory comes from.
enum Memory {
    /// The global allocator, with the layout `(cap, ALIGN)`.
    Heap,
    /// A mapping in huge pages, the buffer's own or shared by the pieces of one huge page:
    /// unmapped with the last of them.
    Mapped { _map: Arc<memmap2::MmapMut> },
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    memory: Memory,
}

// SAFETY: the buffer owns its memory (or its piece of a shared mapping) exclusively, so it
// may move to another thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes; writing needs `&mut`.
unsafe impl Sync for AlignedBuf {}

/// Anonymous memory of `bytes` (a multiple of [`HUGE`]) starting on a huge-page boundary,
/// advised into huge pages. Without them (THP disabled) it is ordinary memory, still aligned.
fn huge_mapping(bytes: usize) -> (memmap2::MmapMut, NonNull<u8>) {
    let mut map = memmap2::MmapMut::map_anon(bytes + HUGE).unwrap_or_else(|_| {
        std::alloc::handle_alloc_error(Layout::from_size_align(bytes, HUGE).expect("layout"))
    });
    let _ = map.advise(memmap2::Advice::HugePage);
    let skip = (HUGE - map.as_ptr() as usize % HUGE) % HUGE;
    let ptr = NonNull::new(map[skip..].as_mut_ptr()).expect("mapped");
    (map, ptr)
}

/// The capacity a buffer of `len` bytes gets: a power of two, at least one page.
fn capacity_for(len: usize) -> usize {
    len.max(ALIGN).next_power_of_two()
}

impl AlignedBuf {
    /// A buffer of `len` bytes (capacity rounded up to a power of two, at least one page).
    /// Its whole capacity starts zeroed, so every byte `Deref` may show is initialised; the
    /// pool makes fresh allocations rare enough that the zeroing does not show in benchmarks.
    pub fn new(len: usize) -> Self {
        Self::alloc(len)
    }

    /// A buffer of `len` zero bytes (the same as [`AlignedBuf::new`], named for callers that
    /// rely on the zeroes).
    pub fn zeroed(len: usize) -> Self {
        Self::alloc(len)
    }

    fn alloc(len: usize) -> Self {
        let cap = capacity_for(len);
        if cap >= HUGE {
            // Fresh anonymous memory reads as zeroes.
            let (map, ptr) = huge_mapping(cap);
            return AlignedBuf {
                ptr,
                cap,
                len,
                memory: Memory::Mapped {
                    _map: Arc::new(map),
                },
            };
        }
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (cap >= ALIGN) and a power-of-two alignment.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            cap,
            len,
            memory: Memory::Heap,
        }
    }

    /// One huge page cut into buffers of `cap` bytes (a power of two below [`HUGE`]).
    fn pieces_of_a_huge_page(cap: usize) -> impl Iterator<Item = AlignedBuf> {
        let (map, base) = huge_mapping(HUGE);
        let map = Arc::new(map);
        (0..HUGE / cap).map(move |i| AlignedBuf {
            // SAFETY: in bounds (i * cap < HUGE, and the mapping holds HUGE bytes from `base`),
            // so the pointer is non-null.
            ptr: unsafe { NonNull::new_unchecked(base.as_ptr().add(i * cap)) },
            cap,
            len: cap,
            memory: Memory::Mapped { _map: map.clone() },
        })
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
        // SAFETY: `ptr` points at `cap >= len` bytes this buffer owns, all initialised (zeroed
        // at allocation) and alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Memory::Heap = self.memory {
            // SAFETY: heap buffers were allocated in `with_capacity` with this very layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            }
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
        let cap = capacity_for(len);
        let class = cap.trailing_zeros() as usize;
        let mut buf = match self.free[class].pop() {
            Some(b) => {
                self.cached -= b.capacity();
                b
            }
            None if (HUGE_FROM..HUGE).contains(&cap) => {
                // The other pieces wait here for the next requests of this size.
                let mut pieces = AlignedBuf::pieces_of_a_huge_page(cap);
                let first = pieces.next().expect("at least one piece");
                for piece in pieces {
                    if self.cached + cap <= self.budget {
                        self.cached += cap;
                        self.free[class].push(piece);
                    }
                }
                first
            }
            None => return AlignedBuf::new(len),
        };
        buf.set_len(len);
        buf
    }

    /// Keep `buf` for reuse. Over budget, buffers of other sizes make room, from the class
    /// holding the most bytes (the sizes in use change: the initial copy's, then the
    /// workload's); when only `buf`'s own size is left, `buf` is freed.
    pub fn put(&mut self, buf: AlignedBuf) {
        let class = buf.capacity().trailing_zeros() as usize;
        while self.cached + buf.capacity() > self.budget {
            let fattest = (0..self.free.len())
                .filter(|&c| c != class)
                .max_by_key(|&c| self.free[c].len() << c)
                .expect("classes exist");
            if self.free[fattest].is_empty() {
                return;
            }
            let old = self.free[fattest].pop().expect("not empty");
            self.cached -= old.capacity();
        }
        self.cached += buf.capacity();
        self.free[class].push(buf);
    }
}

/// `n` rounded up to a whole number of [`ALIGN`] blocks.
pub fn align_up(n: usize) -> usize {
    n.next_multiple_of(ALIGN)
}

/// Buffers that cross threads, given back to the pool by whichever thread drops the last
/// reference. Fresh multi-megabyte buffers cost a page fault and a zeroed page for every 4 KiB
/// touched, and unmapping when freed: without a pool, that was a sixth of the mirror's CPU.
pub struct SharedPool {
    free: std::sync::Mutex<BufPool>,
}

impl SharedPool {
    /// Keeps at most `budget` bytes of free buffers.
    pub fn new(budget: usize) -> std::sync::Arc<SharedPool> {
        std::sync::Arc::new(SharedPool {
            free: std::sync::Mutex::new(BufPool::new(budget)),
        })
    }

    pub fn get(self: &std::sync::Arc<Self>, len: usize) -> PooledBuf {
        PooledBuf {
            buf: Some(self.free.lock().unwrap().get(len)),
            home: Some(self.clone()),
        }
    }
}

/// An [`AlignedBuf`] that goes back to its [`SharedPool`] when dropped.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    home: Option<std::sync::Arc<SharedPool>>,
}

impl From<AlignedBuf> for PooledBuf {
    /// A buffer with no pool: simply freed.
    fn from(buf: AlignedBuf) -> Self {
        PooledBuf {
            buf: Some(buf),
            home: None,
        }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("present until dropped")
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let (Some(buf), Some(home)) = (self.buf.take(), &self.home) {
            home.free.lock().unwrap().put(buf);
        }
    }
}

/// Immutable bytes in block-aligned memory, followed by zeroes up to the next block: what a
/// direct-I/O write of whole blocks needs. Cheap to clone; [`BlockBytes::to_bytes`] gives a
/// `Bytes` over the same memory.
#[derive(Clone)]
pub struct BlockBytes {
    buf: std::sync::Arc<PooledBuf>,
    len: usize,
}

impl BlockBytes {
    /// The first `len` bytes of `buf`; the rest of the block they end in is zeroed.
    pub fn new(mut buf: PooledBuf, len: usize) -> Self {
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
        Self::new(buf.into(), bytes.len())
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

/// Vecs lent to another owner (quinn keeps an encoded set until the mirror acknowledges it)
/// and given back, capacity and all, when that owner drops them.
pub struct VecPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    budget: usize,
}

impl VecPool {
    /// Keeps at most `budget` bytes of capacity in free Vecs.
    pub fn new(budget: usize) -> std::sync::Arc<VecPool> {
        std::sync::Arc::new(VecPool {
            free: std::sync::Mutex::new(Vec::new()),
            budget,
        })
    }

    /// An empty Vec with room for at least `capacity` bytes: the smallest free one that fits.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap();
        let best = (0..free.len())
            .filter(|&i| free[i].capacity() >= capacity)
            .min_by_key(|&i| free[i].capacity());
        match best {
            Some(i) => free.swap_remove(i),
            None => Vec::with_capacity(capacity),
        }
    }

    /// `v` as `Bytes`, without a copy; its memory comes back here when the last clone drops.
    pub fn lend(self: &std::sync::Arc<Self>, v: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(LentVec {
            v,
            home: self.clone(),
        })
    }

    fn give_back(&self, mut v: Vec<u8>) {
        let mut free = self.free.lock().unwrap();
        let cached: usize = free.iter().map(|f| f.capacity()).sum();
        if cached + v.capacity() <= self.budget {
            v.clear();
            free.push(v);
        }
    }
}

struct LentVec {
    v: Vec<u8>,
    home: std::sync::Arc<VecPool>,
}

impl AsRef<[u8]> for LentVec {
    fn as_ref(&self) -> &[u8] {
        &self.v
    }
}

impl Drop for LentVec {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.v));
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
    fn large_buffers_start_on_a_huge_page() {
        let b = AlignedBuf::zeroed(3 << 20);
        assert_eq!(b.as_ptr() as usize % HUGE, 0);
        assert_eq!(b.capacity(), 4 << 20);
        assert!(b.iter().all(|&x| x == 0), "fresh mappings read as zeroes");
        let mut b = AlignedBuf::new(HUGE);
        b.fill(9);
        assert!(b.iter().all(|&x| x == 9));
    }

    #[test]
    fn a_pool_cuts_one_huge_page_into_megabyte_buffers() {
        let mut pool = BufPool::new(8 << 20);
        let mut a = pool.get(1 << 20);
        let mut b = pool.get(1000 << 10);
        assert_eq!(a.as_ptr() as usize % HUGE, 0);
        assert_eq!(
            b.as_ptr() as usize,
            a.as_ptr() as usize + (1 << 20),
            "its other half"
        );
        assert_eq!((b.len(), b.capacity()), (1000 << 10, 1 << 20));
        a.fill(1);
        b.fill(2);
        assert!(
            a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2),
            "no overlap"
        );
        let third = pool.get(1 << 20);
        assert_ne!(
            third.as_ptr() as usize & !(HUGE - 1),
            a.as_ptr() as usize,
            "a new page"
        );
        let pa = a.as_ptr();
        drop(b); // its page stays mapped for `a`
        pool.put(a);
        let again = pool.get(600 << 10);
        assert_eq!(again.as_ptr(), pa, "pieces are reused like buffers");
        assert!(
            again.iter().all(|&x| x == 1),
            "still mapped after its sibling went"
        );
        // Outside a pool, a megabyte comes from the heap (no half page left unused).
        assert!(matches!(AlignedBuf::new(1 << 20).memory, Memory::Heap));
        // A budget smaller than the page keeps no spare piece.
        let mut small = BufPool::new(512 << 10);
        let _one = small.get(1 << 20);
        assert_eq!(small.cached, 0);
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
    fn shared_pool_takes_buffers_back_from_any_thread() {
        let pool = SharedPool::new(1 << 20);
        let b = BlockBytes::new(pool.get(100_000), 100_000);
        let p = b.as_ptr();
        let shared = b.to_bytes();
        drop(b);
        std::thread::spawn(move || drop(shared)).join().unwrap();
        assert_eq!(pool.get(70_000).as_ptr(), p, "the last drop gave it back");
    }

    #[test]
    fn lent_vecs_come_back_with_their_capacity() {
        let pool = VecPool::new(1 << 20);
        let mut v = pool.take(300_000);
        v.extend_from_slice(&[5u8; 1000]);
        let p = v.as_ptr();
        let b = pool.lend(v);
        assert_eq!((b.len(), b.as_ptr()), (1000, p), "no copy");
        let half = b.slice(500..);
        drop(b);
        assert_eq!(pool.take(10).capacity(), 10, "still lent: a new one");
        drop(half);
        let again = pool.take(200_000);
        assert_eq!((again.as_ptr(), again.len()), (p, 0));
        drop(again);
        // Over budget: not kept.
        let big = pool.lend(Vec::with_capacity(2 << 20));
        drop(big);
        assert!(pool.free.lock().unwrap().is_empty());
    }

    #[test]
    fn the_size_in_use_displaces_an_old_one() {
        let mut pool = BufPool::new(64 << 10);
        for _ in 0..8 {
            pool.put(AlignedBuf::new(8 << 10));
        }
        pool.put(AlignedBuf::new(32 << 10));
        assert_eq!(pool.cached, 64 << 10);
        assert_eq!(pool.free[15].len(), 1, "the 32 KiB buffer is kept");
        assert_eq!(pool.free[13].len(), 4, "half of the 8 KiB ones made room");
        pool.put(AlignedBuf::new(32 << 10));
        pool.put(AlignedBuf::new(32 << 10));
        assert_eq!((pool.free[15].len(), pool.free[13].len()), (2, 0));
    }

    #[test]
    fn pool_respects_budget() {
        let mut pool = BufPool::new(8192);
        pool.put(AlignedBuf::new(8192));
        pool.put(AlignedBuf::new(8192));
        assert_eq!(pool.cached, 8192);
    }
}
