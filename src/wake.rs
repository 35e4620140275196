//! Waking whoever waits for a shared resource (journal space, a locked block range, new
//! journal records) without polling, and without tying the resource to one runtime: an NBD
//! connection wakes its io_uring through an eventfd, the shipper its tokio task.

use std::sync::{Arc, Mutex, Weak};

/// Something that can be woken from any thread.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// Everyone waiting for one resource. A waiter registers, re-checks the resource, then sleeps;
/// whoever frees the resource calls [`Waiters::wake_all`]. Waiters that are gone are dropped.
#[derive(Default)]
pub struct Waiters {
    list: Mutex<Vec<Weak<dyn Wake>>>,
}

impl Waiters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wake `w` at the next `wake_all` (once; register again to wait again). Registering the
    /// same waiter twice wakes it once.
    pub fn register(&self, w: &Arc<dyn Wake>) {
        let mut list = self.list.lock().unwrap();
        let weak = Arc::downgrade(w);
        if !list.iter().any(|x| Weak::ptr_eq(x, &weak)) {
            list.push(weak);
        }
    }

    /// Wake every registered waiter.
    pub fn wake_all(&self) {
        let woken: Vec<Weak<dyn Wake>> = std::mem::take(&mut *self.list.lock().unwrap());
        for w in woken {
            if let Some(w) = w.upgrade() {
                w.wake();
            }
        }
    }

    /// Wake every registered waiter and keep them registered (a subscriber, like the shipper,
    /// that always wants to hear of new records). Called for every journal record: no
    /// allocation, and the wakers it calls must not block.
    pub fn notify_subscribers(&self) {
        let mut l = self.list.lock().unwrap();
        l.retain(|w| match w.upgrade() {
            Some(w) => {
                w.wake();
                true
            }
            None => false,
        });
    }
}

/// Wakes a tokio task.
impl Wake for tokio::sync::Notify {
    fn wake(&self) {
        self.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Count(AtomicU32);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn waiters_are_woken_once_and_subscribers_always() {
        let w = Waiters::new();
        let a: Arc<Count> = Arc::new(Count(AtomicU32::new(0)));
        let dyn_a: Arc<dyn Wake> = a.clone();
        w.register(&dyn_a);
        w.register(&dyn_a);
        w.wake_all();
        w.wake_all();
        assert_eq!(a.0.load(Ordering::Relaxed), 1);
        w.register(&dyn_a);
        w.notify_subscribers();
        w.notify_subscribers();
        assert_eq!(a.0.load(Ordering::Relaxed), 3);
        drop(dyn_a);
        drop(a);
        w.notify_subscribers();
    }
}
