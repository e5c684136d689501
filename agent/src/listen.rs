//! Waiting for the controller (`cosmos agent --listen`) instead of dialing it:
//! the controller reaches the agent through SSH (a channel to this Unix
//! socket or loopback port) or directly on a trusted network.
//!
//! The bytes are the same framed protocol; only the opening differs: the
//! controller proves first that it holds the agent token
//! ([`handshake::answer_controller`]), because anyone who can reach the
//! socket could otherwise read the agent's token off its hello. One
//! controller connection at a time: a second is refused, with the reason, on
//! the wire and in the log.

use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, Hello, Refusal, Token};
use cosmos_proto::{BoxStream, Connection};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Mode of the agent's Unix socket: its owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Connections that may be in their handshake at once; more are closed at
/// once, so local peers that connect and say nothing cannot pile up.
pub const HANDSHAKES_PENDING_MAX: usize = 8;

/// Where the agent waits for the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket (mode 0660), optionally handed to a group.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// Group given the socket (name or number), so its members (the SSH user) may connect.
        group: Option<String>,
    },
    /// A TCP port, for loopback (through SSH's direct-tcpip) or a trusted network.
    Tcp(SocketAddr),
}

impl ListenAddr {
    /// Parses `unix:PATH` or `HOST:PORT` (an IP address and port).
    pub fn parse(s: &str, group: Option<String>) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "--listen {s}: the socket path must be absolute, e.g. unix:/run/cosmos/agent.sock"
                ));
            }
            return Ok(ListenAddr::Unix { path: PathBuf::from(path), group });
        }
        if group.is_some() {
            return Err("--listen-group applies to a Unix socket (--listen unix:PATH) only".into());
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!(
                "--listen {s}: expected unix:PATH (e.g. unix:/run/cosmos/agent.sock) or IP:PORT (e.g. 127.0.0.1:7702)"
            )
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix { path, .. } => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// The listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process already serves the socket.
    #[error(
        "cannot listen on unix:{}: another process accepts connections on it (another agent?); stop it or pick another path",
        path.display()
    )]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// The path holds something that is not a socket.
    #[error("cannot listen on unix:{}: the path exists and is not a socket; remove it or pick another path", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket's mode or group could not be set.
    #[error("cannot give the socket {} mode {SOCKET_MODE:o} and group {group}: {reason}", path.display())]
    Permissions {
        /// The socket's path.
        path: PathBuf,
        /// The group asked for (`-` for none).
        group: String,
        /// Why.
        reason: String,
    },
}

/// A bound listener; a Unix socket's file goes when it is dropped.
pub(crate) enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// Binds `addr`; a Unix socket left by an agent that died is replaced, a live one is not.
    pub(crate) async fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
        let bind_err = |source| ListenError::Bind { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Tcp(a) => {
                if !a.ip().is_loopback() {
                    tracing::warn!(
                        listen = %a,
                        "the agent listens on a port other hosts can reach: the agent token is then its only protection and the traffic is unencrypted; use 127.0.0.1 (reached through SSH) unless this network is trusted"
                    );
                }
                Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(bind_err)?))
            }
            ListenAddr::Unix { path, group } => {
                remove_stale_socket(path)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(bind_err)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
                let listener = Listener::Unix(listener, path.clone());
                // Until the mode is set the socket has the umask's mode: a peer that
                // connects then still has to prove it holds the token.
                set_socket_permissions(path, group.as_deref())?;
                Ok(listener)
            }
        }
    }

    /// The next connection and a description of its peer, for logs.
    async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                let peer = match s.peer_cred() {
                    Ok(c) => format!(
                        "unix:{} (pid {}, uid {})",
                        path.display(),
                        c.pid().map_or_else(|| "?".into(), |p| p.to_string()),
                        c.uid()
                    ),
                    Err(_) => format!("unix:{}", path.display()),
                };
                Ok((Box::new(s), peer))
            }
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket { path: path.to_path_buf() });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse { path: path.to_path_buf() });
    }
    std::fs::remove_file(path).map_err(|source| ListenError::Bind { addr: format!("unix:{}", path.display()), source })
}

fn set_socket_permissions(path: &Path, group: Option<&str>) -> Result<(), ListenError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |reason: String| ListenError::Permissions {
        path: path.to_path_buf(),
        group: group.unwrap_or("-").into(),
        reason,
    };
    if let Some(group) = group {
        let gid = group_id(group).map_err(&fail)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| fail(format!("{e} (only root, or a member of the group, may hand a file to a group)")))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(|e| fail(e.to_string()))
}

/// A group's id from its name or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| format!("group `{group}` holds a NUL byte"))?;
    // SAFETY: getgrnam_r writes into the struct and buffer we own, sized as passed.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc != 0 || found.is_null() {
            return Err(format!(
                "no group `{group}` on this host (see `getent group {group}`; create it with groupadd)"
            ));
        }
        Ok(grp.gr_gid)
    }
}

/// A controller connection whose handshake passed, holding the agent's one controller slot.
pub(crate) struct Accepted {
    pub(crate) conn: Connection<BoxStream>,
    pub(crate) peer: String,
    /// Released when the link ends: then the next controller connection is taken.
    pub(crate) slot: OwnedSemaphorePermit,
}

/// The one controller connection the agent serves at a time, and who holds it.
#[derive(Clone)]
struct Slot {
    free: Arc<Semaphore>,
    holder: Arc<Mutex<String>>,
}

/// Accepts controller connections until dropped, handing each whose
/// handshake passed to `tx`; the rest are refused, saying why.
pub(crate) fn spawn(
    listener: Listener,
    hello: Hello,
    token: Token,
    frame_bytes_max: u32,
    tx: mpsc::Sender<Accepted>,
) -> JoinHandle<()> {
    let slot = Slot { free: Arc::new(Semaphore::new(1)), holder: Arc::new(Mutex::new(String::new())) };
    let pending = Arc::new(Semaphore::new(HANDSHAKES_PENDING_MAX));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a controller connection failed");
                    // Out of descriptors, most likely: give closing connections time to free some.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%peer, pending_max = HANDSHAKES_PENDING_MAX, "too many connections in their handshake; closing this one");
                continue;
            };
            let (hello, token, slot, tx) = (hello.clone(), token.clone(), slot.clone(), tx.clone());
            tokio::spawn(async move {
                let answered = answer(stream, &peer, &hello, &token, frame_bytes_max, &slot).await;
                drop(permit);
                match answered {
                    Ok((conn, held)) => {
                        let _ = tx.send(Accepted { conn, peer, slot: held }).await;
                    }
                    Err(e) => tracing::warn!(%peer, "refused a controller connection: {e}"),
                }
            });
        }
    })
}

async fn answer(
    stream: BoxStream,
    peer: &str,
    hello: &Hello,
    token: &Token,
    frame_bytes_max: u32,
    slot: &Slot,
) -> Result<(Connection<BoxStream>, OwnedSemaphorePermit), handshake::HandshakeError> {
    let mut conn = Connection::new(stream, frame_bytes_max);
    let mut held = None;
    let check = |controller: Hello| {
        let decided = match slot.free.clone().try_acquire_owned() {
            Ok(permit) => {
                *slot.holder.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("controller `{}` from {peer}", controller.node_id);
                held = Some(permit);
                Ok(())
            }
            Err(_) => {
                let holder = slot.holder.lock().unwrap_or_else(|e| e.into_inner()).clone();
                Err(Refusal::Other(format!(
                    "agent `{}` already serves {holder}, and serves one controller at a time; stop the other controller (the agent takes the next connection once it notices the first is gone)",
                    hello.node_id
                )))
            }
        };
        async move { decided }
    };
    handshake::answer_controller(&mut conn, hello, token, DEFAULT_HANDSHAKE_TIMEOUT_MS, check).await?;
    let held = held.expect("the check took the slot before the handshake passed");
    Ok((conn, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_and_bad_ones_say_the_forms() {
        assert_eq!(
            ListenAddr::parse("unix:/run/cosmos/agent.sock", Some("cosmos".into())).unwrap(),
            ListenAddr::Unix { path: "/run/cosmos/agent.sock".into(), group: Some("cosmos".into()) }
        );
        assert_eq!(
            ListenAddr::parse("127.0.0.1:7702", None).unwrap(),
            ListenAddr::Tcp("127.0.0.1:7702".parse().unwrap())
        );
        for (bad, says) in [("unix:agent.sock", "absolute"), ("localhost", "unix:PATH"), ("127.0.0.1", "IP:PORT")] {
            let e = ListenAddr::parse(bad, None).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = ListenAddr::parse("127.0.0.1:7702", Some("g".into())).unwrap_err();
        assert!(e.contains("Unix socket"), "{e}");
    }

    #[test]
    fn groups_resolve_by_name_or_number_and_an_unknown_one_is_named() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("no-such-group-cosmos").unwrap_err();
        assert!(e.contains("no-such-group-cosmos") && e.contains("getent"), "{e}");
    }
}
