//! Loom models of [`CommitQueue`]: every interleaving of producers, the writer and close.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p cosmos-sync --release --tests`
//! (scripts/test does, in its own target directory).
#![cfg(loom)]

use cosmos_sync::{Closed, CommitQueue, Ticket};
use loom::sync::Arc;
// The log is not under test: std's Mutex adds no branch points, so loom spends its
// interleavings on the queue. Loom runs one thread at a time, so it never contends.
use loom::thread;
use std::sync::Mutex;

/// Explores every interleaving with at most a few preemptions (the usual loom bound: bugs
/// needing more are rare, and the unbounded space of this model takes far too long).
/// `LOOM_MAX_PREEMPTIONS` overrides the default.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_PREEMPTION_BOUND);
    }
    builder.check(f);
}

/// Preemptions per execution explored when `LOOM_MAX_PREEMPTIONS` is unset.
const DEFAULT_PREEMPTION_BOUND: usize = 3;

/// What the model's writer has "written": pushes it recorded before marking them durable.
type Log = Arc<Mutex<Vec<(u8, u8)>>>;

fn spawn_writer(q: &Arc<CommitQueue<(u8, u8)>>, log: &Log) -> thread::JoinHandle<()> {
    let (q, log) = (Arc::clone(q), Arc::clone(log));
    thread::spawn(move || {
        while let Some(batch) = q.take_batch() {
            assert!(!batch.items.is_empty(), "the writer is only woken for work");
            log.lock().unwrap().extend(batch.items);
            q.mark_durable(batch.upto);
        }
    })
}

/// Asserts `items` were recorded by the writer: durability must never run ahead of the write.
fn assert_written(log: &Log, items: &[(u8, u8)]) {
    let log = log.lock().unwrap();
    for it in items {
        assert!(log.contains(it), "{it:?} reported durable before the writer wrote it");
    }
}

/// Two producers and one writer over a queue of one item, so every second push waits for space.
#[test]
fn two_producers_one_writer_lose_nothing_keep_order_and_never_deadlock() {
    model(|| {
        let q = Arc::new(CommitQueue::new(1));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let writer = spawn_writer(&q, &log);

        let first = {
            let (q, log) = (Arc::clone(&q), Arc::clone(&log));
            thread::spawn(move || {
                let t1 = q.push(vec![(1, 0)]).unwrap();
                let t2 = q.push(vec![(1, 1)]).unwrap();
                assert!(t2 > t1, "tickets increase");
                // A later ticket covers the earlier push too.
                q.wait_durable(t2).unwrap();
                assert_written(&log, &[(1, 0), (1, 1)]);
            })
        };
        // The model's main thread is the second producer: one thread fewer to interleave.
        let t = q.push(vec![(2, 0)]).unwrap();
        q.wait_durable(t).unwrap();
        assert_written(&log, &[(2, 0)]);

        first.join().unwrap();
        q.close();
        writer.join().unwrap();

        let log = log.lock().unwrap();
        let mut sorted = log.clone();
        sorted.sort();
        assert_eq!(sorted, [(1, 0), (1, 1), (2, 0)], "each item written exactly once");
        let firsts: Vec<_> = log.iter().filter(|it| it.0 == 1).collect();
        assert_eq!(firsts, [&(1, 0), &(1, 1)], "one producer's pushes stay in push order");
        assert_eq!(q.durable(), Ticket(3));
    });
}

/// A producer blocked on a full queue, or waiting on durability, is released when the writer fails.
#[test]
fn a_writer_failure_releases_blocked_producers_and_waiters() {
    model(|| {
        let q = Arc::new(CommitQueue::new(1));
        let producer = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let t = q.push(vec![1u8])?;
                // The second push may block on the bound until the failure releases it.
                let t = q.push(vec![2u8]).unwrap_or(t);
                q.wait_durable(t)
            })
        };
        let writer = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                if let Some(batch) = q.take_batch() {
                    assert!(!batch.items.is_empty());
                }
                q.fail("disk full".to_string());
            })
        };
        writer.join().unwrap();
        let failed = Closed { failure: Some("disk full".to_string()) };
        assert_eq!(producer.join().unwrap(), Err(failed));
        assert_eq!(q.durable(), Ticket(0));
    });
}

/// Close racing the writer and a waiter: the pushed item is still written and its waiter told so.
#[test]
fn close_lets_the_writer_drain_before_waiters_give_up() {
    model(|| {
        let q = Arc::new(CommitQueue::new(1));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let writer = spawn_writer(&q, &log);
        let producer = {
            let (q, log) = (Arc::clone(&q), Arc::clone(&log));
            thread::spawn(move || {
                let t = q.push(vec![(1, 0)]).unwrap();
                q.close();
                q.wait_durable(t).unwrap();
                assert_written(&log, &[(1, 0)]);
            })
        };
        producer.join().unwrap();
        writer.join().unwrap();
        assert_eq!(q.push(vec![(1, 1)]), Err(Closed { failure: None }));
    });
}
