//! Job events for clients that wait: every durable change of a job (and of
//! its live attempt's progress), in order, numbered, kept in a bounded ring
//! that `GET /v1/events` streams as server-sent events. A waiting client
//! reads each change once instead of listing every job every few hundred
//! milliseconds.
//!
//! Cursors are `EPOCH:SEQ`: sequence numbers start again at each controller
//! start, whose epoch differs, so a client resuming across a restart (or one
//! that fell further behind than the ring reaches) is told to resync: to list
//! its jobs again and follow from the cursor that listing gives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Events kept for clients that fall behind or reconnect; an older cursor gets a resync.
pub const EVENTS_KEPT_MAX: usize = 20_000;
/// Events sent in one piece of a stream.
pub const EVENTS_PER_READ_MAX: usize = 1_000;

/// A position in the event stream: events after it are new to its holder.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The controller epoch whose events these are.
    pub epoch: u64,
    /// The last event seen (0: none).
    pub seq: u64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Cursor, String> {
        let bad =
            || format!("`{s}` is not an event cursor (EPOCH:SEQ, as `Cosmos-Events-Cursor` or an `id:` line gives)");
        let (epoch, seq) = s.split_once(':').ok_or_else(bad)?;
        Ok(Cursor { epoch: epoch.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// What a reader gets after its cursor.
#[derive(Debug)]
pub enum Since<T> {
    /// The events after it, oldest first (empty: nothing new yet).
    Events(Vec<(u64, Arc<T>)>),
    /// Its events are gone (another epoch, or older than the ring): list again.
    Resync(Cursor),
}

/// The ring of recent events (the controller keeps job summaries in it), shared by
/// the actor (which appends) and the HTTP workers (which read).
pub struct EventLog<T> {
    epoch: u64,
    ring: Mutex<Ring<T>>,
    appended: tokio::sync::Notify,
}

struct Ring<T> {
    /// The last sequence number handed out.
    last_seq: u64,
    events: VecDeque<(u64, Arc<T>)>,
}

impl<T> EventLog<T> {
    /// An empty log for the controller start of `epoch`.
    pub fn new(epoch: u64) -> EventLog<T> {
        EventLog {
            epoch,
            ring: Mutex::new(Ring { last_seq: 0, events: VecDeque::new() }),
            appended: tokio::sync::Notify::new(),
        }
    }

    /// Appends one job's new state; wakes every stream.
    pub fn push(&self, job: Arc<T>) {
        {
            let mut ring = self.lock();
            ring.last_seq += 1;
            let seq = ring.last_seq;
            if ring.events.len() == EVENTS_KEPT_MAX {
                ring.events.pop_front();
            }
            ring.events.push_back((seq, job));
        }
        self.appended.notify_waiters();
    }

    /// Where the stream stands now: a listing taken at this moment is followed from here.
    pub fn head(&self) -> Cursor {
        Cursor { epoch: self.epoch, seq: self.lock().last_seq }
    }

    /// The events after `after`, at most [`EVENTS_PER_READ_MAX`].
    pub fn since(&self, after: Cursor) -> Since<T> {
        let ring = self.lock();
        let oldest_kept = ring.events.front().map_or(ring.last_seq + 1, |(seq, _)| *seq);
        // `after.seq + 1` is the first one wanted: it must still be here (or not yet exist).
        if after.epoch != self.epoch || after.seq > ring.last_seq || after.seq + 1 < oldest_kept {
            return Since::Resync(Cursor { epoch: self.epoch, seq: ring.last_seq });
        }
        let skip = (after.seq + 1 - oldest_kept) as usize;
        Since::Events(ring.events.iter().skip(skip).take(EVENTS_PER_READ_MAX).cloned().collect())
    }

    /// Resolves at the next append after this call (register before checking [`EventLog::since`]).
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.appended.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring<T>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: u64) -> Arc<u64> {
        Arc::new(id)
    }

    fn ids(since: Since<u64>) -> Vec<(u64, u64)> {
        match since {
            Since::Events(e) => e.iter().map(|(seq, j)| (*seq, **j)).collect(),
            Since::Resync(c) => panic!("resync to {c}"),
        }
    }

    #[test]
    fn a_reader_gets_what_came_after_its_cursor_in_order() {
        let log = EventLog::<u64>::new(7);
        let start = log.head();
        assert_eq!(start, Cursor { epoch: 7, seq: 0 });
        assert_eq!(ids(log.since(start)), []);
        for id in 1..=3 {
            log.push(summary(id));
        }
        assert_eq!(ids(log.since(start)), [(1, 1), (2, 2), (3, 3)]);
        assert_eq!(ids(log.since(Cursor { epoch: 7, seq: 2 })), [(3, 3)]);
        assert_eq!(log.head().to_string(), "7:3");
        assert_eq!("7:3".parse::<Cursor>().unwrap(), log.head());
        assert!("7".parse::<Cursor>().is_err() && "a:1".parse::<Cursor>().is_err());
    }

    #[test]
    fn a_cursor_of_another_epoch_or_older_than_the_ring_or_from_the_future_resyncs() {
        let log = EventLog::<u64>::new(2);
        for id in 0..(EVENTS_KEPT_MAX as u64 + 10) {
            log.push(summary(id));
        }
        let head = log.head();
        for stale in
            [Cursor { epoch: 1, seq: head.seq }, Cursor { epoch: 2, seq: 5 }, Cursor { epoch: 2, seq: head.seq + 1 }]
        {
            match log.since(stale) {
                Since::Resync(c) => assert_eq!(c, head, "{stale}"),
                Since::Events(_) => panic!("{stale} should resync"),
            }
        }
        // The oldest event kept is still readable; reads are bounded.
        let oldest = head.seq - EVENTS_KEPT_MAX as u64 + 1;
        let Since::Events(e) = log.since(Cursor { epoch: 2, seq: oldest - 1 }) else { panic!("in range") };
        assert_eq!((e.len(), e[0].0), (EVENTS_PER_READ_MAX, oldest));
    }
}
