//! What the service manager hears from the agent (systemd's `sd_notify`
//! protocol): `READY=1` once its GPUs are read and its runtime has recovered
//! what the last agent left, a `STATUS=` line an operator reads in `systemctl
//! status`, `WATCHDOG=1` from the shell's main loop (the loop that would
//! hang), and `STOPPING=1`. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

/// How often the status line is refreshed (and the watchdog pinged, when it asks for no more often).
pub const STATUS_INTERVAL_MS: u64 = 2_000;

/// What the status line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Connected to the controller now.
    pub connected: bool,
    /// Where the controller is (an address, or where the agent listens).
    pub controller: String,
    /// Attempts running or stopping here.
    pub attempts: usize,
    /// GPUs offered.
    pub gpus: usize,
    /// GPUs quarantined or faulty.
    pub quarantined: usize,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.connected {
            write!(f, "connected to the controller {}", self.controller)?;
        } else {
            write!(f, "waiting for the controller {}", self.controller)?;
        }
        let s = if self.attempts == 1 { "" } else { "s" };
        write!(f, "; {} attempt{s} running; {} of {} GPUs quarantined", self.attempts, self.quarantined, self.gpus)
    }
}

/// Tells the service manager the agent serves.
pub fn ready(status: &Status) {
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status.to_string())]);
}

/// Tells the service manager the agent stops (its attempts keep running).
pub fn stopping() {
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping; running attempts keep running for the next agent"),
    ]);
}

/// The main loop is alive: a watchdog ping, and the status line when it changed.
pub fn alive(status: &Status, last: &mut Option<Status>) {
    let mut states = Vec::new();
    if sd_notify::watchdog_enabled().is_some() {
        states.push(sd_notify::NotifyState::Watchdog);
    }
    let line = status.to_string();
    if last.as_ref() != Some(status) {
        states.push(sd_notify::NotifyState::Status(&line));
    }
    if !states.is_empty() {
        notify(&states);
    }
    *last = Some(status.clone());
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
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
