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

/// Wake `w` at `at` (or at once if that has passed), from one timer thread shared by the
/// process: for a waiter that must wait a while (a write being paced) and has no clock of its
/// own. Held weakly: a waiter gone by then is not woken.
pub fn wake_at(at: std::time::Instant, w: &Arc<dyn Wake>) {
    let timer = TIMER.get_or_init(|| {
        let t = Arc::new(Timer::default());
        let run = t.clone();
        std::thread::Builder::new()
            .name("wake-timer".into())
            .spawn(move || run.run())
            .expect("spawn the wake timer thread");
        t
    });
    let mut due = timer.due.lock().unwrap();
    due.push(Due(at, Arc::downgrade(w)));
    timer.changed.notify_one();
}

static TIMER: std::sync::OnceLock<Arc<Timer>> = std::sync::OnceLock::new();

#[derive(Default)]
struct Timer {
    due: Mutex<std::collections::BinaryHeap<Due>>,
    changed: std::sync::Condvar,
}

/// A wake-up due at a time; the heap's top is the earliest.
struct Due(std::time::Instant, Weak<dyn Wake>);

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.cmp(&self.0)
    }
}

impl Timer {
    fn run(&self) {
        let mut due = self.due.lock().unwrap();
        loop {
            let now = std::time::Instant::now();
            match due.peek().map(|d| d.0) {
                None => due = self.changed.wait(due).unwrap(),
                Some(at) if at > now => {
                    due = self.changed.wait_timeout(due, at - now).unwrap().0;
                }
                Some(_) => {
                    let Due(_, w) = due.pop().expect("peeked");
                    // Woken without the lock: a waker may register the next wake-up.
                    drop(due);
                    if let Some(w) = w.upgrade() {
                        w.wake();
                    }
                    due = self.due.lock().unwrap();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn wake_at_wakes_no_earlier_than_due() {
        let a: Arc<Count> = Arc::new(Count(AtomicU32::new(0)));
        let dyn_a: Arc<dyn Wake> = a.clone();
        let t0 = std::time::Instant::now();
        wake_at(t0 + std::time::Duration::from_millis(30), &dyn_a);
        wake_at(t0, &dyn_a);
        let deadline = t0 + std::time::Duration::from_secs(10);
        while a.0.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The second wake-up came no earlier than it was due.
        assert!(t0.elapsed() >= std::time::Duration::from_millis(30));
        assert_eq!(a.0.load(Ordering::Relaxed), 2);
    }

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
