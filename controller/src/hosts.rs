//! Hosts the controller reaches itself (`cosmos agents add ssh://…`): the
//! registry, stored in the data directory so it survives restarts, and one
//! task per host that keeps one link to its agent, reconnecting with
//! jittered backoff. How a stream to a host is opened is the
//! [`HostDialer`]'s business (the `cosmos` binary plugs the SSH transport
//! in); once open, the stream joins the agents' ordinary path
//! ([`crate::agent_link::serve_dialed`]), and the core never learns how the
//! agent was reached.

use crate::actor::CoreActor;
use crate::shared::Shared;
use actix::Addr;
use cosmos_proto::BoxStream;
use cosmos_proto::handshake::Token;
use cosmos_proto::retry::Backoff;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// First wait before reconnecting to a host.
pub const RECONNECT_MIN_MS: u64 = 500;
/// Longest wait between two tries.
pub const RECONNECT_MAX_MS: u64 = 30_000;
/// The registry's file in the data directory.
pub const HOSTS_FILE: &str = "hosts.json";

/// One registered host, as `cosmos agents add` gave it and `hosts.json` stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// `ssh://USER@HOST[:PORT]`.
    pub url: String,
    /// A private key to offer first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// A file holding an encrypted key's passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    /// `ssh://USER@BASTION[:PORT]` to go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump: Option<String>,
    /// The agent's socket on the host (default `/run/cosmos/agent.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// The agent's loopback port on the host, instead of a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Learn the host's key on first contact (accept-new) instead of refusing an unknown one.
    #[serde(default)]
    pub accept_new_host_key: bool,
}

/// Opens byte streams to registered hosts' agents (the SSH transport).
pub trait HostDialer: Send + Sync + std::fmt::Debug + 'static {
    /// Checks an entry before it is stored; returns the host's name (what `agents remove` takes).
    fn validate(&self, entry: &HostEntry) -> Result<String, String>;
    /// Opens a stream to the entry's agent; the error says what failed and the fix.
    fn open(&self, entry: &HostEntry) -> BoxFuture<'static, Result<BoxStream, String>>;
}

/// How one host's link stands, for `cosmos agents hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// The host's name.
    pub name: String,
    /// What was registered.
    pub entry: HostEntry,
    /// `connecting`, `connected` or `retrying`.
    pub state: String,
    /// The last failure, while retrying (or the reason the last link ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Tries that failed since the last link.
    pub failures: u32,
}

/// The registry could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// No transport to reach hosts with.
    #[error("this controller was started without an SSH transport, so it cannot reach hosts itself")]
    NoDialer,
    /// The entry does not describe a reachable host.
    #[error("{0}")]
    Invalid(String),
    /// No host of that name.
    #[error("no registered host `{0}` (see `cosmos agents hosts`)")]
    NotFound(String),
    /// The file could not be read or written.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct HostsFile {
    hosts: Vec<HostEntry>,
}

struct Slot {
    entry: HostEntry,
    view: Arc<Mutex<HostView>>,
    /// Dropped: the host's task stops and closes its link.
    _stop: oneshot::Sender<()>,
}

/// What a host's task needs to serve the links it opens.
#[derive(Clone)]
struct LinkContext {
    core: Addr<CoreActor>,
    token: Token,
    frame_bytes_max: u32,
    shared: Arc<Shared>,
    dialer: Arc<dyn HostDialer>,
    arbiter: actix::ArbiterHandle,
}

/// The registered hosts and their links.
pub struct Hosts {
    path: PathBuf,
    ctx: Option<LinkContext>,
    slots: Mutex<BTreeMap<String, Slot>>,
}

impl Hosts {
    /// Loads the registry from `dir` and starts a link task per host on the
    /// current arbiter (the controller's main one). Must run inside an actix system.
    pub(crate) fn start(
        dir: &Path,
        dialer: Option<Arc<dyn HostDialer>>,
        core: Addr<CoreActor>,
        token: Token,
        frame_bytes_max: u32,
        shared: Arc<Shared>,
    ) -> Result<Hosts, HostsError> {
        let path = dir.join(HOSTS_FILE);
        let stored: HostsFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| HostsError::File { path: path.clone(), reason: format!("not a hosts file: {e}") })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HostsFile::default(),
            Err(e) => return Err(HostsError::File { path, reason: e.to_string() }),
        };
        let ctx = dialer.map(|dialer| LinkContext {
            core,
            token,
            frame_bytes_max,
            shared,
            dialer,
            arbiter: actix::Arbiter::current(),
        });
        let hosts = Hosts { path, ctx, slots: Mutex::new(BTreeMap::new()) };
        if !stored.hosts.is_empty() && hosts.ctx.is_none() {
            return Err(HostsError::File {
                path: hosts.path.clone(),
                reason: "hosts are registered but this controller has no SSH transport to reach them".into(),
            });
        }
        for entry in stored.hosts {
            let name = hosts.validate(&entry)?;
            hosts.spawn(name, entry);
        }
        Ok(hosts)
    }

    /// Closes every host's link and stops redialing (the controller stops); the registry stays.
    pub(crate) fn stop_all(&self) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn validate(&self, entry: &HostEntry) -> Result<String, HostsError> {
        let ctx = self.ctx.as_ref().ok_or(HostsError::NoDialer)?;
        if entry.socket.is_some() && entry.port.is_some() {
            return Err(HostsError::Invalid("give the agent's --socket or its --port, not both".into()));
        }
        ctx.dialer.validate(entry).map_err(HostsError::Invalid)
    }

    fn spawn(&self, name: String, entry: HostEntry) {
        let Some(ctx) = self.ctx.clone() else { return };
        let view = Arc::new(Mutex::new(HostView {
            name: name.clone(),
            entry: entry.clone(),
            state: "connecting".into(),
            error: None,
            failures: 0,
        }));
        let (stop, stopped) = oneshot::channel();
        let task_view = view.clone();
        let task_entry = entry.clone();
        let task_name = name.clone();
        ctx.arbiter.clone().spawn(async move {
            tokio::select! {
                _ = stopped => tracing::info!(host = task_name, "its link is closed (the host was removed, or the controller stops)"),
                () = keep_linked(task_name.clone(), task_entry, ctx, task_view) => {}
            }
        });
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.insert(name, Slot { entry, view, _stop: stop });
    }

    /// Registers (or replaces) a host, stores the registry, and starts linking to it.
    pub fn add(&self, entry: HostEntry) -> Result<HostView, HostsError> {
        let name = self.validate(&entry)?;
        {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.get(&name) {
                if slot.entry == entry {
                    return Ok(slot.view.lock().unwrap_or_else(|e| e.into_inner()).clone());
                }
            }
            let mut all: Vec<HostEntry> =
                slots.iter().filter(|(n, _)| **n != name).map(|(_, s)| s.entry.clone()).collect();
            all.push(entry.clone());
            self.store(all)?;
        }
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        self.spawn(name.clone(), entry);
        Ok(self.view(&name).expect("just added"))
    }

    /// Forgets a host and closes its link.
    pub fn remove(&self, name: &str) -> Result<HostEntry, HostsError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(name) {
            return Err(HostsError::NotFound(name.to_string()));
        }
        let rest = slots.iter().filter(|(n, _)| *n != name).map(|(_, s)| s.entry.clone()).collect();
        self.store(rest)?;
        Ok(slots.remove(name).expect("checked").entry)
    }

    /// Every registered host and how its link stands.
    pub fn list(&self) -> Vec<HostView> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.values().map(|s| s.view.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect()
    }

    fn view(&self, name: &str) -> Option<HostView> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(name).map(|s| s.view.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Writes the registry through a temporary file, synced, then renamed.
    fn store(&self, mut hosts: Vec<HostEntry>) -> Result<(), HostsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        hosts.sort_by(|a, b| a.url.cmp(&b.url));
        let fail = |e: std::io::Error| HostsError::File { path: self.path.clone(), reason: e.to_string() };
        let tmp = self.path.with_extension("json-tmp");
        let _ = std::fs::remove_file(&tmp);
        let body = serde_json::to_vec_pretty(&HostsFile { hosts }).expect("host entries serialize");
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(fail)?;
        f.write_all(&body).and_then(|()| f.sync_all()).map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        }
        Ok(())
    }
}

/// Keeps one link to the host until the task is dropped: opens a stream,
/// serves it until it ends, waits out a jittered backoff, and again. A
/// failure that repeats is logged once, not at every try.
async fn keep_linked(name: String, entry: HostEntry, ctx: LinkContext, view: Arc<Mutex<HostView>>) {
    let seed = name.bytes().fold(crate::shared::wall_ms(), |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut backoff = Backoff::new(RECONNECT_MIN_MS, RECONNECT_MAX_MS, seed);
    let mut last_error: Option<String> = None;
    let set = |state: &str, error: Option<String>, failures: u32| {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        v.state = state.into();
        v.error = error;
        v.failures = failures;
    };
    let mut failures = 0u32;
    loop {
        let opened = ctx.dialer.open(&entry).await;
        let served = match opened {
            Ok(stream) => {
                let peer: crate::actor::Peer = entry.url.as_str().into();
                crate::agent_link::serve_dialed(
                    stream,
                    peer,
                    ctx.core.clone(),
                    ctx.token.clone(),
                    ctx.frame_bytes_max,
                    ctx.shared.clone(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match served {
            Ok(link) => {
                tracing::info!(host = name, url = entry.url, failed_tries = failures, "linked to the host's agent");
                failures = 0;
                last_error = None;
                backoff.reset();
                set("connected", None, 0);
                let mut link = link;
                let reason = link.ended().await;
                tracing::warn!(host = name, reason, "the link to the host's agent ended; reconnecting");
                set("retrying", Some(reason), 0);
            }
            Err(e) => {
                failures += 1;
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(
                        host = name,
                        url = entry.url,
                        error = %e,
                        retry_max_ms = RECONNECT_MAX_MS,
                        "cannot link to the host's agent; retrying with backoff (repeats of this error are not logged)"
                    );
                    last_error = Some(e.clone());
                }
                set("retrying", Some(e), failures);
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
        let error = view.lock().unwrap_or_else(|e| e.into_inner()).error.clone();
        set("connecting", error, failures);
    }
}
