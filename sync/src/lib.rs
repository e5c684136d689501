//! Hand-written synchronisation primitives, each with a loom model (`tests/loom.rs`).
//!
//! [`CommitQueue`] is the group-commit queue between the controller's actor
//! shell and its store writer: producers push batches of items and get a
//! [`Ticket`]; the writer takes everything pending at once, persists it in one
//! transaction (one fsync for many transitions) and marks it durable; a
//! producer that must not act before its writes are durable waits on its
//! ticket.

pub mod dir_lock;

use std::collections::VecDeque;
use std::fmt;
use std::sync::PoisonError;

/// Swaps in loom's instrumented primitives when the model checker runs (`--cfg loom`).
mod sync {
    #[cfg(loom)]
    pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
    #[cfg(not(loom))]
    pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
}

use sync::{Condvar, Mutex, MutexGuard};

/// Names a push: the writes of every push up to and including it are durable once `durable() >= ticket`.
///
/// Tickets increase with every non-empty push; `Ticket(0)` is "nothing", durable from the start.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Everything the writer takes at once.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<T> {
    /// All items pending when taken, in push order.
    pub items: Vec<T>,
    /// The ticket of the last push in `items`: pass it to [`CommitQueue::mark_durable`] once they are written.
    pub upto: Ticket,
}

/// The queue no longer accepts or completes work: closed, or its writer failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The writer's reason when it failed; `None` when the queue was closed normally.
    pub failure: Option<String>,
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Some(reason) => write!(
                f,
                "the store writer failed ({reason}); writes not yet durable were lost: \
                 fix the cause and restart the controller, which reloads what was durable"
            ),
            None => {
                f.write_str("the commit queue is closed (the controller is shutting down); retry after it restarts")
            }
        }
    }
}

impl std::error::Error for Closed {}

struct State<T> {
    /// Items pushed but not yet taken by the writer, oldest first.
    pending: VecDeque<T>,
    /// Ticket of the newest push.
    issued: Ticket,
    /// Highest ticket handed to the writer.
    taken: Ticket,
    /// Highest ticket the writer reported durable.
    durable: Ticket,
    /// No more pushes; the writer drains what is pending.
    closed: bool,
    /// The writer's failure, reported to every waiter.
    failure: Option<String>,
}

/// A bounded multi-producer, single-writer group-commit queue; share it through an `Arc`.
pub struct CommitQueue<T> {
    state: Mutex<State<T>>,
    /// Producers blocked on a full queue wait here.
    space: Condvar,
    /// The writer waits here for something to take.
    work: Condvar,
    /// Producers waiting for durability wait here.
    progress: Condvar,
    max_pending_items: usize,
}

impl<T> CommitQueue<T> {
    /// An empty queue; `push` blocks while `max_pending_items` items wait for the writer.
    ///
    /// # Panics
    /// If `max_pending_items` is zero: nothing could ever be pushed.
    pub fn new(max_pending_items: usize) -> CommitQueue<T> {
        assert!(max_pending_items > 0, "a commit queue needs room for at least one item");
        CommitQueue {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                issued: Ticket(0),
                taken: Ticket(0),
                durable: Ticket(0),
                closed: false,
                failure: None,
            }),
            space: Condvar::new(),
            work: Condvar::new(),
            progress: Condvar::new(),
            max_pending_items,
        }
    }

    /// The bound given to [`CommitQueue::new`].
    pub fn max_pending_items(&self) -> usize {
        self.max_pending_items
    }

    /// Queues `items` for the writer, blocking while the queue is full, and returns their ticket.
    ///
    /// A push larger than the bound is let in alone once the queue is empty,
    /// rather than blocking forever. An empty push queues nothing and returns
    /// the newest ticket, so waiting on it waits for everything pushed before.
    pub fn push(&self, items: Vec<T>) -> Result<Ticket, Closed> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Err(Closed { failure: st.failure.clone() });
            }
            if items.is_empty() {
                return Ok(st.issued);
            }
            if st.pending.is_empty() || st.pending.len() + items.len() <= self.max_pending_items {
                break;
            }
            st = wait(&self.space, st);
        }
        st.pending.extend(items);
        st.issued = Ticket(st.issued.0 + 1);
        let ticket = st.issued;
        drop(st);
        self.work.notify_one();
        Ok(ticket)
    }

    /// For the writer: blocks until items are pending and takes them all; `None` once closed and drained.
    ///
    /// After [`CommitQueue::fail`] it returns `None` at once: the writer is done.
    pub fn take_batch(&self) -> Option<Batch<T>> {
        let mut st = self.lock();
        loop {
            if st.failure.is_some() {
                return None;
            }
            if !st.pending.is_empty() {
                break;
            }
            if st.closed {
                return None;
            }
            st = wait(&self.work, st);
        }
        let items: Vec<T> = st.pending.drain(..).collect();
        st.taken = st.issued;
        let upto = st.taken;
        drop(st);
        // Every blocked producer re-checks: what fits depends on each one's size.
        self.space.notify_all();
        Some(Batch { items, upto })
    }

    /// For the writer: everything up to `upto` is durable; wakes those waiting on it.
    pub fn mark_durable(&self, upto: Ticket) {
        let mut st = self.lock();
        debug_assert!(upto <= st.taken, "marked {upto:?} durable, but only {:?} was taken", st.taken);
        if upto > st.durable {
            st.durable = upto;
        }
        drop(st);
        self.progress.notify_all();
    }

    /// For the writer: it cannot go on; every waiter and later push gets `reason`.
    pub fn fail(&self, reason: String) {
        let mut st = self.lock();
        if st.failure.is_none() {
            st.failure = Some(reason);
        }
        st.closed = true;
        drop(st);
        self.wake_all();
    }

    /// Blocks until everything up to `ticket` is durable.
    ///
    /// Fails if the writer failed first, or if the queue was closed and the
    /// writer stopped without making `ticket` durable.
    pub fn wait_durable(&self, ticket: Ticket) -> Result<(), Closed> {
        let mut st = self.lock();
        loop {
            if st.durable >= ticket {
                return Ok(());
            }
            if let Some(reason) = &st.failure {
                return Err(Closed { failure: Some(reason.clone()) });
            }
            // Closed with nothing pending or in the writer's hands: no mark can come any more.
            if st.closed && st.pending.is_empty() && st.taken <= st.durable {
                return Err(Closed { failure: None });
            }
            st = wait(&self.progress, st);
        }
    }

    /// The highest durable ticket, without waiting.
    pub fn durable(&self) -> Ticket {
        self.lock().durable
    }

    /// The ticket of the newest push, without waiting: what the writer has yet to make durable when above [`durable`](Self::durable).
    pub fn issued(&self) -> Ticket {
        self.lock().issued
    }

    /// Refuses further pushes; the writer still drains and marks what is pending.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake_all();
    }

    fn wake_all(&self) {
        self.space.notify_all();
        self.work.notify_all();
        self.progress.notify_all();
    }

    /// No code panics while holding the lock with the state half-updated, so a poisoned lock is still consistent.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

impl<T> fmt::Debug for CommitQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("CommitQueue")
            .field("pending_items", &st.pending.len())
            .field("issued", &st.issued)
            .field("taken", &st.taken)
            .field("durable", &st.durable)
            .field("closed", &st.closed)
            .field("failure", &st.failure)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::Duration;

    /// The writer of these tests: records each batch, then marks it durable.
    fn spawn_writer<T: Send + 'static>(
        q: &Arc<CommitQueue<T>>,
        written: &Arc<Mutex<Vec<T>>>,
    ) -> thread::JoinHandle<usize> {
        let (q, written) = (Arc::clone(q), Arc::clone(written));
        thread::spawn(move || {
            let mut batches = 0;
            while let Some(batch) = q.take_batch() {
                written.lock().unwrap().extend(batch.items);
                q.mark_durable(batch.upto);
                batches += 1;
            }
            batches
        })
    }

    #[test]
    fn many_producers_every_item_written_once_in_push_order_and_durable_before_wait_returns() {
        const PRODUCERS: usize = 8;
        const PUSHES: usize = 200;
        let q = Arc::new(CommitQueue::<(usize, usize, usize)>::new(16));
        let written = Arc::new(Mutex::new(Vec::new()));
        let writer = spawn_writer(&q, &written);
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (q, written) = (Arc::clone(&q), Arc::clone(&written));
                thread::spawn(move || {
                    for i in 0..PUSHES {
                        let items: Vec<_> = (0..1 + i % 3).map(|k| (p, i, k)).collect();
                        let ticket = q.push(items.clone()).unwrap();
                        if i % 10 == 0 {
                            q.wait_durable(ticket).unwrap();
                            assert!(q.durable() >= ticket);
                            let w = written.lock().unwrap();
                            assert!(items.iter().all(|it| w.contains(it)), "durable before written");
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        q.close();
        let batches = writer.join().unwrap();
        let written = written.lock().unwrap();
        let expected: usize = (0..PUSHES).map(|i| 1 + i % 3).sum::<usize>() * PRODUCERS;
        assert_eq!(written.len(), expected, "every item exactly once");
        for p in 0..PRODUCERS {
            let mine: Vec<_> = written.iter().filter(|it| it.0 == p).map(|it| (it.1, it.2)).collect();
            let want: Vec<_> = (0..PUSHES).flat_map(|i| (0..1 + i % 3).map(move |k| (i, k))).collect();
            assert_eq!(mine, want, "producer {p}'s items in push order");
        }
        assert!(batches <= PRODUCERS * PUSHES);
        assert_eq!(q.durable(), Ticket((PRODUCERS * PUSHES) as u64));
    }

    #[test]
    fn push_blocks_while_the_bound_is_reached() {
        let q = Arc::new(CommitQueue::new(4));
        assert_eq!(q.push(vec![1, 2, 3]).unwrap(), Ticket(1));
        let pushed = Arc::new(AtomicUsize::new(0));
        let producer = {
            let (q, pushed) = (Arc::clone(&q), Arc::clone(&pushed));
            thread::spawn(move || {
                q.push(vec![4, 5]).unwrap();
                pushed.store(1, Ordering::SeqCst);
            })
        };
        // Not a timing assertion: the push must still be blocked, however long we wait.
        thread::sleep(Duration::from_millis(50));
        assert_eq!(pushed.load(Ordering::SeqCst), 0, "3 + 2 items exceed the bound of 4");
        let batch = q.take_batch().unwrap();
        assert_eq!(batch, Batch { items: vec![1, 2, 3], upto: Ticket(1) });
        producer.join().unwrap();
        assert_eq!(q.take_batch().unwrap(), Batch { items: vec![4, 5], upto: Ticket(2) });
    }

    #[test]
    fn pending_items_never_exceed_the_bound() {
        let q = Arc::new(CommitQueue::new(5));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (q, max_seen) = (Arc::clone(&q), Arc::clone(&max_seen));
            thread::spawn(move || {
                while let Some(batch) = q.take_batch() {
                    max_seen.fetch_max(batch.items.len(), Ordering::SeqCst);
                    q.mark_durable(batch.upto);
                }
            })
        };
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let q = Arc::clone(&q);
                thread::spawn(move || {
                    for i in 0..500 {
                        q.push(vec![p; 1 + (i % 5)]).unwrap();
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        q.close();
        writer.join().unwrap();
        assert!(max_seen.load(Ordering::SeqCst) <= 5);
    }

    #[test]
    fn an_oversized_push_goes_in_alone() {
        let q = CommitQueue::new(2);
        let t = q.push(vec![1, 2, 3, 4]).unwrap();
        assert_eq!(q.take_batch().unwrap(), Batch { items: vec![1, 2, 3, 4], upto: t });
    }

    #[test]
    fn an_empty_push_is_a_barrier_on_earlier_pushes() {
        let q = CommitQueue::<u8>::new(2);
        assert_eq!(q.push(vec![]).unwrap(), Ticket(0));
        q.wait_durable(Ticket(0)).unwrap();
        let t = q.push(vec![1]).unwrap();
        assert_eq!(q.push(vec![]).unwrap(), t);
        let b = q.take_batch().unwrap();
        q.mark_durable(b.upto);
        q.wait_durable(t).unwrap();
    }

    #[test]
    fn close_refuses_pushes_but_the_writer_drains_and_waiters_finish() {
        let q = Arc::new(CommitQueue::new(8));
        let t = q.push(vec!["a", "b"]).unwrap();
        q.close();
        assert_eq!(q.push(vec!["c"]), Err(Closed { failure: None }));
        let waiter = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.wait_durable(t))
        };
        let b = q.take_batch().unwrap();
        assert_eq!(b.items, ["a", "b"]);
        q.mark_durable(b.upto);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(q.take_batch(), None, "closed and drained");
    }

    #[test]
    fn close_wakes_a_blocked_producer_and_an_idle_writer() {
        let q = Arc::new(CommitQueue::new(1));
        q.push(vec![0]).unwrap();
        let producer = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.push(vec![1]))
        };
        let idle = Arc::new(CommitQueue::<u8>::new(1));
        let writer = {
            let idle = Arc::clone(&idle);
            thread::spawn(move || idle.take_batch())
        };
        thread::sleep(Duration::from_millis(20));
        q.close();
        idle.close();
        assert_eq!(producer.join().unwrap(), Err(Closed { failure: None }));
        assert_eq!(writer.join().unwrap(), None);
    }

    #[test]
    fn a_waiter_on_a_ticket_the_stopped_writer_never_marked_gets_closed() {
        let q = Arc::new(CommitQueue::new(8));
        let t = q.push(vec![1]).unwrap();
        let b = q.take_batch().unwrap();
        q.close();
        let waiter = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.wait_durable(t))
        };
        thread::sleep(Duration::from_millis(20));
        // The writer still holds the batch: the waiter must wait for its verdict, not give up.
        assert!(!waiter.is_finished());
        q.mark_durable(b.upto);
        assert_eq!(waiter.join().unwrap(), Ok(()));

        let q = CommitQueue::<u8>::new(8);
        q.close();
        assert_eq!(q.wait_durable(Ticket(1)), Err(Closed { failure: None }));
    }

    #[test]
    fn a_writer_failure_reaches_every_waiter_and_later_pushes() {
        let q = Arc::new(CommitQueue::new(8));
        let t1 = q.push(vec![1]).unwrap();
        let t2 = q.push(vec![2]).unwrap();
        let waiters: Vec<_> = [t1, t2]
            .into_iter()
            .map(|t| {
                let q = Arc::clone(&q);
                thread::spawn(move || q.wait_durable(t))
            })
            .collect();
        let b = q.take_batch().unwrap();
        assert_eq!(b.upto, t2);
        q.fail("disk I/O error".to_string());
        let failed = Closed { failure: Some("disk I/O error".to_string()) };
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err(failed.clone()));
        }
        assert_eq!(q.push(vec![3]), Err(failed.clone()));
        assert_eq!(q.take_batch(), None);
        assert!(failed.to_string().contains("disk I/O error"));
        // Durability reached before the failure still counts.
        q.mark_durable(Ticket(0));
        assert_eq!(q.wait_durable(Ticket(0)), Ok(()));
    }
}
