//! What the service manager hears from the controller (systemd's `sd_notify`
//! protocol): `READY=1` once the store is loaded and both listeners are bound,
//! a `STATUS=` line an operator reads in `systemctl status`, `WATCHDOG=1` after
//! every round trip through the core actor (the loop that would hang), and
//! `STOPPING=1` when it stops. Without `NOTIFY_SOCKET` (not under systemd, or a
//! unit that is not `Type=notify`) every call here does nothing.

use crate::actor::{CoreActor, Status, StatusView};
use crate::records::StoreOp;
use actix::Addr;
use cosmos_sync::{CommitQueue, Ticket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether the store writer moves: the durable ticket, and since when it has not while work waited.
#[derive(Debug)]
pub struct WriterProgress {
    durable: Ticket,
    waiting_since: Option<Instant>,
}

impl WriterProgress {
    /// Progress as of a durable ticket.
    pub fn new(durable: Ticket) -> WriterProgress {
        WriterProgress { durable, waiting_since: None }
    }

    /// How long work has waited with no commit, once past [`STORE_STALL_MS`]; `None` while the writer keeps up.
    pub fn stalled_ms(&mut self, durable: Ticket, issued: Ticket, now: Instant) -> Option<u64> {
        if durable != self.durable || issued <= durable {
            self.durable = durable;
            self.waiting_since = (issued > durable).then_some(now);
            return None;
        }
        let since = *self.waiting_since.get_or_insert(now);
        let ms = now.duration_since(since).as_millis() as u64;
        (ms > STORE_STALL_MS).then_some(ms)
    }
}

/// How often the status line is refreshed (and the watchdog pinged, when it asks for no more often).
pub const STATUS_INTERVAL_MS: u64 = 2_000;
/// Bound on one round trip through the core actor; past it no ping is sent.
pub const CORE_ANSWER_TIMEOUT_MS: u64 = 5_000;
/// How long the store writer may hold work without committing any before no ping is sent:
/// a commit takes milliseconds, and a writer stuck in `fsync` or on a lock acknowledges nothing.
pub const STORE_STALL_MS: u64 = 15_000;

/// Tells the service manager the controller serves, with its first status line.
pub fn ready(status: &str) {
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// Tells the service manager the controller is stopping.
pub fn stopping(status: &str) {
    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status(status)]);
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The status line: what runs, what waits, who is connected, what is quarantined.
pub fn status_line(view: &StatusView) -> String {
    let connected = view.agents.iter().filter(|a| a.connected).count();
    let quarantined: usize = view.agents.iter().map(|a| a.gpu_quarantine.len()).sum();
    format!(
        "{} running, {} queued; {connected} of {} agents connected; {quarantined} GPUs quarantined",
        plural(view.live_attempts, "job"),
        view.queue_depth,
        view.agents.len(),
    )
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Interval between two pings (and status lines): the status interval, or half
/// the watchdog's timeout when that is shorter, so one late answer does not get
/// the daemon killed.
pub fn ping_interval() -> Duration {
    match sd_notify::watchdog_enabled() {
        Some(timeout) => (timeout / 2).clamp(Duration::from_millis(100), Duration::from_millis(STATUS_INTERVAL_MS)),
        None => Duration::from_millis(STATUS_INTERVAL_MS),
    }
}

/// Runs until the actor is gone: every interval, asks the core actor for its
/// status and, when it answers in time, sends the status line and a watchdog
/// ping. A core that stops answering stops the pings, and systemd restarts the
/// controller once `WatchdogSec` passes.
pub async fn keepalive(core: Addr<CoreActor>, queue: Arc<CommitQueue<StoreOp>>) {
    let interval = ping_interval();
    let watchdog = sd_notify::watchdog_enabled().is_some();
    let mut last = String::new();
    let mut writer = WriterProgress::new(queue.durable());
    loop {
        tokio::time::sleep(interval).await;
        if let Some(stalled_ms) = writer.stalled_ms(queue.durable(), queue.issued(), Instant::now()) {
            tracing::error!(
                stalled_ms,
                durable = queue.durable().0,
                issued = queue.issued().0,
                "the store writer has committed nothing for {stalled_ms} ms while work waits; no watchdog ping this round"
            );
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(CORE_ANSWER_TIMEOUT_MS), core.send(Status)).await {
            Ok(Ok(view)) => {
                let line = status_line(&view);
                let mut states = Vec::new();
                if watchdog {
                    states.push(sd_notify::NotifyState::Watchdog);
                }
                if line != last {
                    states.push(sd_notify::NotifyState::Status(&line));
                }
                if !states.is_empty() {
                    notify(&states);
                }
                last = line;
            }
            Ok(Err(_)) => return,
            Err(_) => tracing::error!(
                timeout_ms = CORE_ANSWER_TIMEOUT_MS,
                "the core did not answer a status request in time; no watchdog ping this round"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_that_commits_nothing_while_work_waits_counts_as_stalled_only_past_the_bound() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = WriterProgress::new(Ticket(0));
        // Idle: nothing issued, never stalled however long.
        assert_eq!(w.stalled_ms(Ticket(0), Ticket(0), at(60_000)), None);
        // Work waits from 60 s; commits keep coming, so no stall.
        assert_eq!(w.stalled_ms(Ticket(0), Ticket(3), at(60_000)), None);
        assert_eq!(w.stalled_ms(Ticket(2), Ticket(5), at(70_000)), None);
        // From 70 s on nothing commits while 5 waits: a stall once the bound passes.
        assert_eq!(w.stalled_ms(Ticket(2), Ticket(5), at(70_000 + STORE_STALL_MS)), None);
        assert_eq!(w.stalled_ms(Ticket(2), Ticket(6), at(71_000 + STORE_STALL_MS)), Some(STORE_STALL_MS + 1_000));
        // A commit ends it.
        assert_eq!(w.stalled_ms(Ticket(6), Ticket(6), at(72_000 + STORE_STALL_MS)), None);
    }
}
