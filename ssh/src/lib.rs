//! The controller's SSH transport: dials a GPU host with russh, as the
//! operators' own SSH would (their keys, their ssh-agent, their
//! `~/.ssh/config`, their `known_hosts`), and opens one channel to the
//! host's agent — `direct-streamlocal` to its Unix socket, or
//! `direct-tcpip` to its loopback port. The channel's bytes are the
//! ordinary cosmos protocol: the caller sees a byte stream and nothing else.
//!
//! Each SSH connection carries exactly one channel, and the caller's reader
//! task always reads it: in russh a channel nobody reads fills its queue and
//! stalls the whole connection, keepalive replies included.

// `SshError` is large (the unknown-host variant carries the line to trust),
// and it is returned once per connection attempt: boxing it buys nothing.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod known_hosts;

/// The SFTP client `Session::sftp` returns, for its callers.
pub use russh_sftp;

use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default bound on reaching a host's port and finishing SSH's key exchange.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default silence after which a keepalive is sent (OpenSSH's `ServerAliveInterval`).
pub const KEEPALIVE_INTERVAL_MS_DEFAULT: u64 = 5_000;
/// Default keepalives unanswered before the connection counts as dead (`ServerAliveCountMax`).
pub const KEEPALIVE_MAX_DEFAULT: usize = 3;
/// Channel window: what the host may send before we acknowledge it. russh's
/// default (2 MiB) caps a transfer at 2 MiB per round trip; OpenSSH grows its
/// windows to 16 MiB.
pub const WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest packet we accept: russh warns above 64 KiB; OpenSSH sends 32 KiB packets on forwarded channels.
pub const PACKET_BYTES_MAX: u32 = 65_535;
/// Messages queued per channel before russh stops reading the connection.
pub const CHANNEL_QUEUE_LEN: usize = 512;
/// Idle time before the kernel probes a TCP connection, then between probes.
pub const TCP_KEEPALIVE_MS: u64 = 10_000;

/// `ssh://[USER@]HOST[:PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The login user; none: `~/.ssh/config`'s `User`, else `$USER`.
    pub user: Option<String>,
    /// The host as given (an alias `~/.ssh/config` may resolve).
    pub host: String,
    /// The port; none: `~/.ssh/config`'s `Port`, else 22.
    pub port: Option<u16>,
}

impl Target {
    /// Parses `ssh://[USER@]HOST[:PORT]` (IPv6 hosts in brackets: `ssh://u@[::1]:2222`).
    pub fn parse(s: &str) -> Result<Target, String> {
        let form = "expected ssh://USER@HOST[:PORT], e.g. ssh://ops@gpu-3 or ssh://ops@10.0.0.5:2222";
        let rest = s.strip_prefix("ssh://").ok_or_else(|| format!("`{s}`: {form}"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
            Some(_) => return Err(format!("`{s}`: the user before @ is empty; {form}")),
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("`{s}`: unclosed [ in the host; {form}"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(format!("`{s}`: no host; {form}"));
        }
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("`{s}`: port `{p}` is not 1-65535"))?,
            ),
            None => None,
        };
        Ok(Target { user, host: host.to_string(), port })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ssh://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?
        } else {
            f.write_str(&self.host)?
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Where the agent listens on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket (`cosmos agent --listen unix:PATH`), reached with `direct-streamlocal`.
    Socket(String),
    /// A loopback port (`cosmos agent --listen 127.0.0.1:PORT`), reached with `direct-tcpip`.
    Port(u16),
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::Socket(p) => write!(f, "unix:{p}"),
            AgentEndpoint::Port(p) => write!(f, "127.0.0.1:{p}"),
        }
    }
}

/// What to do with a host whose key `known_hosts` does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Refuse it, printing the line that would trust it (OpenSSH's `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Record it and go on; a changed key is still refused (`StrictHostKeyChecking accept-new`).
    AcceptNew,
}

/// How to reach one host.
#[derive(Clone, Debug)]
pub struct Options {
    /// A private key to offer first (`--identity`).
    pub identity: Option<PathBuf>,
    /// A file holding the passphrase of an encrypted key.
    pub passphrase_file: Option<PathBuf>,
    /// The passphrase itself, as a person typed it for an interactive command
    /// (`cosmos agent install` at a terminal); a file, when given, comes first.
    pub passphrase: Option<String>,
    /// A bastion to go through (`--jump`); none: `~/.ssh/config`'s `ProxyJump`, if any.
    pub jump: Option<Target>,
    /// The agent's socket or port on the host.
    pub agent: AgentEndpoint,
    /// Unknown host keys: refused or learned.
    pub host_keys: HostKeyPolicy,
    /// The `known_hosts` file checked (and appended to under accept-new).
    pub known_hosts: PathBuf,
    /// The `ssh_config` file read; none: `~/.ssh/config` when it exists.
    pub ssh_config: Option<PathBuf>,
    /// The ssh-agent whose keys are offered after the key files (default: `SSH_AUTH_SOCK`'s); none: no agent.
    pub agent_socket: Option<PathBuf>,
    /// Bound on reaching the port and the key exchange.
    pub connect_timeout_ms: u64,
    /// Silence after which a keepalive is sent.
    pub keepalive_interval_ms: u64,
    /// Keepalives unanswered before the connection is dropped.
    pub keepalive_max: usize,
}

impl Options {
    /// Defaults for reaching `agent`: strict host keys in `~/.ssh/known_hosts`, the ssh-agent of `SSH_AUTH_SOCK`.
    pub fn new(agent: AgentEndpoint) -> Options {
        Options {
            identity: None,
            passphrase_file: None,
            passphrase: None,
            jump: None,
            agent,
            host_keys: HostKeyPolicy::Strict,
            known_hosts: known_hosts::default_path().unwrap_or_else(|| PathBuf::from("known_hosts")),
            ssh_config: None,
            agent_socket: std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()).map(PathBuf::from),
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            keepalive_interval_ms: KEEPALIVE_INTERVAL_MS_DEFAULT,
            keepalive_max: KEEPALIVE_MAX_DEFAULT,
        }
    }
}

/// Reaching a host over SSH failed; every message names the host, and the key or user where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// `~/.ssh/config` (or the file given) cannot be read.
    #[error("ssh config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TCP connection failed.
    #[error("cannot reach {host}:{port}: {source}")]
    Connect {
        /// Host name connected to.
        host: String,
        /// Port.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step did not finish in time.
    #[error("{what} with {host}:{port} timed out after {timeout_ms} ms")]
    Timeout {
        /// The step.
        what: &'static str,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The bound.
        timeout_ms: u64,
    },
    /// The SSH protocol failed (key exchange, a dropped connection).
    #[error("ssh with {host}:{port}: {reason}")]
    Protocol {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// russh's reason.
        reason: String,
    },
    /// The host's key is not in `known_hosts`, and strict checking is on.
    #[error(
        "the host key of {name} is not in {}{}; check the key's fingerprint ({fingerprint}) with the host's owner, then trust it by adding this line (what `ssh-keyscan{} {host}` prints) to that file:\n  {line}\nor register the host with --accept-new-host-key to learn it on first contact",
        known_hosts.display(), others(other_types), port_flag(*port)
    )]
    UnknownHostKey {
        /// The name checked (`host` or `[host]:port`).
        name: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The file.
        known_hosts: PathBuf,
        /// The key's SHA256 fingerprint.
        fingerprint: String,
        /// The line that would trust it.
        line: String,
        /// Keys of other types on file for the host: (algorithm, line).
        other_types: Vec<(String, usize)>,
    },
    /// The host presented a key other than the one on file.
    #[error(
        "REFUSED: the host key of {name} has CHANGED: {} line {line} records another key; it now presents {fingerprint}. Either the host was reinstalled or someone is intercepting the connection. If the change is expected, remove the old key (`ssh-keygen -R '{name}' -f {}`) and trust the new one",
        known_hosts.display(), known_hosts.display()
    )]
    ChangedHostKey {
        /// The name checked.
        name: String,
        /// The file.
        known_hosts: PathBuf,
        /// The line with the old key.
        line: usize,
        /// The new key's fingerprint.
        fingerprint: String,
    },
    /// The host's key is marked `@revoked`.
    #[error("REFUSED: the host key of {name} ({fingerprint}) is marked @revoked in {} line {line}", known_hosts.display())]
    RevokedHostKey {
        /// The name checked.
        name: String,
        /// The file.
        known_hosts: PathBuf,
        /// The line.
        line: usize,
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// The known_hosts file cannot be read or written.
    #[error("known_hosts {}: {source}", path.display())]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file is encrypted and no passphrase was given.
    #[error(
        "the key {} is encrypted and needs its passphrase: register the host with --identity-passphrase-file FILE (a file holding only the passphrase, mode 0600), or load the key into the controller's ssh-agent (`ssh-add {}`)",
        key.display(), key.display()
    )]
    KeyNeedsPassphrase {
        /// The key file.
        key: PathBuf,
    },
    /// The passphrase typed at the terminal does not open the key.
    #[error("the passphrase typed does not decrypt the key {}", key.display())]
    WrongTypedPassphrase {
        /// The key.
        key: PathBuf,
    },
    /// The passphrase given does not open the key.
    #[error("the passphrase in {} does not decrypt the key {}", passphrase_file.display(), key.display())]
    WrongPassphrase {
        /// The key file.
        key: PathBuf,
        /// The passphrase file.
        passphrase_file: PathBuf,
    },
    /// The passphrase file may be read by its group or others: the passphrase is no longer a secret.
    #[error(
        "the passphrase file {} has mode {mode:04o}: others than its owner may read it; `chmod 600 {}` (and change the passphrase if others did read it)",
        passphrase_file.display(), passphrase_file.display()
    )]
    PassphraseFileOpen {
        /// The passphrase file.
        passphrase_file: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file cannot be read or parsed.
    #[error("cannot use the key {}: {reason}", key.display())]
    BadKey {
        /// The key file.
        key: PathBuf,
        /// Why.
        reason: String,
    },
    /// The host refused every key offered.
    #[error(
        "{user}@{host}:{port} refused every key offered ({}); add one of their public keys to ~{user}/.ssh/authorized_keys on {host}, or give the right key with --identity",
        if tried.is_empty() { "none was found: no --identity, no IdentityFile, no ~/.ssh/id_*, no ssh-agent".to_string() } else { tried.join("; ") }
    )]
    AuthRefused {
        /// The login user.
        user: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// What was offered, in words.
        tried: Vec<String>,
    },
    /// sshd would not open a channel to the agent.
    #[error(
        "sshd on {host} refused a channel to the agent at {endpoint} ({reason}): is the agent running there with `cosmos agent --listen {endpoint}`, may {user} connect to it (socket group: --listen-group), and does sshd allow it (OpenSSH needs AllowStreamLocalForwarding for a socket, and AllowTcpForwarding too, for both)?"
    )]
    Channel {
        /// Host.
        host: String,
        /// The login user.
        user: String,
        /// The agent's socket or port.
        endpoint: AgentEndpoint,
        /// sshd's reason.
        reason: String,
    },
    /// Going through the jump host failed.
    #[error("through the jump host {jump}: {source}")]
    Jump {
        /// The jump host.
        jump: String,
        /// What went wrong there.
        #[source]
        source: Box<SshError>,
    },
}

fn others(other_types: &[(String, usize)]) -> String {
    if other_types.is_empty() {
        return String::new();
    }
    let list: Vec<String> = other_types.iter().map(|(a, l)| format!("{a} at line {l}")).collect();
    format!(" (it records keys of other types for it: {})", list.join(", "))
}

fn port_flag(port: u16) -> String {
    if port == 22 { String::new() } else { format!(" -p {port}") }
}

impl cosmos_proto::Classify for SshError {
    /// Network trouble may pass; keys, host keys and configuration need someone to change something.
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(match self {
            SshError::Connect { .. } | SshError::Timeout { .. } | SshError::Protocol { .. } => true,
            // The agent may not be up yet (it is being installed or restarted).
            SshError::Channel { .. } => true,
            SshError::Jump { source, .. } => source.is_retryable(),
            _ => false,
        })
    }
}

/// An open channel to a host's agent: a byte stream. It holds the SSH
/// connection (and the jump host's), which close when it is dropped.
pub struct SshStream {
    stream: russh::ChannelStream<Msg>,
    // Held so the sessions live as long as the stream; dropped after it.
    _sessions: Vec<Handle<HostKeyCheck>>,
}

impl AsyncRead for SshStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reaches `target`'s agent over SSH and returns the channel to it.
pub async fn open(target: &Target, opts: &Options) -> Result<SshStream, SshError> {
    connect(target, opts).await?.into_agent_stream(&opts.agent).await
}

/// An authenticated SSH connection to a host (through its jump host, if
/// any), for commands and SFTP (`cosmos agent install`) or the agent channel.
pub struct Session {
    /// The host's own session last; the jump host's before it.
    sessions: Vec<Handle<HostKeyCheck>>,
    host: String,
    port: u16,
    user: String,
}

/// What a command run over an exec channel left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit status; none: it was killed by a signal (or sshd sent no status).
    pub status: Option<u32>,
    /// What it wrote on stdout.
    pub stdout: Vec<u8>,
    /// What it wrote on stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Its stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Its stderr as text, trimmed.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// Reaches `target` over SSH: key exchange, host key, authentication (through the jump host, if any).
pub async fn connect(target: &Target, opts: &Options) -> Result<Session, SshError> {
    let resolved = config::resolve(target, opts)?;
    let mut sessions = Vec::new();
    let session = match &resolved.jump {
        None => {
            let tcp = tcp_connect(&resolved.host_name, resolved.port, opts.connect_timeout_ms).await?;
            session(tcp, &resolved, opts).await?
        }
        Some(jump) => {
            let jump_name = jump.to_string();
            let wrap = |source| SshError::Jump { jump: jump_name.clone(), source: Box::new(source) };
            // The bastion is resolved through ssh_config too, but goes no further itself.
            let mut jump_opts = opts.clone();
            jump_opts.jump = None;
            let jr = config::resolve(jump, &jump_opts).map_err(wrap)?;
            let jr = config::Resolved { jump: None, ..jr };
            let tcp = tcp_connect(&jr.host_name, jr.port, opts.connect_timeout_ms).await.map_err(wrap)?;
            let bastion = session(tcp, &jr, &jump_opts).await.map_err(wrap)?;
            let channel = bastion
                .channel_open_direct_tcpip(resolved.host_name.clone(), u32::from(resolved.port), "127.0.0.1", 0)
                .await
                .map_err(|e| {
                    wrap(SshError::Protocol {
                        host: jr.host_name.clone(),
                        port: jr.port,
                        reason: format!(
                            "it would not forward to {}:{} ({e}); does its sshd allow AllowTcpForwarding?",
                            resolved.host_name, resolved.port
                        ),
                    })
                })?;
            sessions.push(bastion);
            session(channel.into_stream(), &resolved, opts).await?
        }
    };
    sessions.push(session);
    Ok(Session { sessions, host: resolved.host_name, port: resolved.port, user: resolved.user })
}

impl Session {
    /// The host name connected to (after `~/.ssh/config`'s `HostName`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The login user.
    pub fn user(&self) -> &str {
        &self.user
    }

    fn handle(&self) -> &Handle<HostKeyCheck> {
        self.sessions.last().expect("a session holds the host's connection")
    }

    fn protocol(&self, what: &str, e: impl std::fmt::Display) -> SshError {
        SshError::Protocol { host: self.host.clone(), port: self.port, reason: format!("{what}: {e}") }
    }

    /// Runs `command` through the login user's shell, feeding it `stdin` then end-of-file,
    /// and reads its output to the end (the channel is read until sshd closes it).
    pub async fn exec(&self, command: &str, stdin: &[u8]) -> Result<ExecOutput, SshError> {
        let mut channel =
            self.handle().channel_open_session().await.map_err(|e| self.protocol("opening a session channel", e))?;
        channel.exec(true, command).await.map_err(|e| self.protocol("starting a command", e))?;
        if !stdin.is_empty() {
            channel.data(stdin).await.map_err(|e| self.protocol("writing a command's input", e))?;
        }
        channel.eof().await.map_err(|e| self.protocol("closing a command's input", e))?;
        let mut out = ExecOutput { status: None, stdout: Vec::new(), stderr: Vec::new() };
        while let Some(msg) = channel.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                russh::ChannelMsg::ExtendedData { data, .. } => out.stderr.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                russh::ChannelMsg::Failure => {
                    return Err(self.protocol("starting a command", "sshd refused to run it"));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Opens the SFTP subsystem (OpenSSH's sftp-server).
    pub async fn sftp(&self) -> Result<russh_sftp::client::SftpSession, SshError> {
        let channel =
            self.handle().channel_open_session().await.map_err(|e| self.protocol("opening a session channel", e))?;
        channel.request_subsystem(true, "sftp").await.map_err(|e| self.protocol("starting SFTP", e))?;
        russh_sftp::client::SftpSession::new(channel.into_stream())
            .await
            .map_err(|e| self.protocol("starting SFTP (is sshd's `Subsystem sftp` configured?)", e))
    }

    /// Opens a channel to the host's agent, which then holds this session.
    pub async fn into_agent_stream(self, agent: &AgentEndpoint) -> Result<SshStream, SshError> {
        let stream = self.agent_channel(agent).await?;
        Ok(SshStream { stream, _sessions: self.sessions })
    }

    /// Opens a channel to the host's agent; it works while this session lives.
    pub async fn agent_channel(&self, agent: &AgentEndpoint) -> Result<russh::ChannelStream<Msg>, SshError> {
        let session = self.handle();
        let channel = match agent {
            AgentEndpoint::Socket(path) => session.channel_open_direct_streamlocal(path.clone()).await,
            AgentEndpoint::Port(port) => {
                session.channel_open_direct_tcpip("127.0.0.1", u32::from(*port), "127.0.0.1", 0).await
            }
        }
        .map_err(|e| SshError::Channel {
            host: self.host.clone(),
            user: self.user.clone(),
            endpoint: agent.clone(),
            reason: e.to_string(),
        })?;
        Ok(channel.into_stream())
    }
}

async fn tcp_connect(host: &str, port: u16, timeout_ms: u64) -> Result<tokio::net::TcpStream, SshError> {
    let connect = tokio::net::TcpStream::connect((host, port));
    let stream = tokio::time::timeout(Duration::from_millis(timeout_ms), connect)
        .await
        .map_err(|_| SshError::Timeout { what: "connecting", host: host.into(), port, timeout_ms })?
        .map_err(|source| SshError::Connect { host: host.into(), port, source })?;
    let _ = stream.set_nodelay(true);
    // The kernel notices a peer that vanished even while SSH has nothing to say.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_millis(TCP_KEEPALIVE_MS))
        .with_interval(Duration::from_millis(TCP_KEEPALIVE_MS));
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(stream)
}

fn client_config(opts: &Options, known_algorithms: Vec<russh::keys::Algorithm>) -> client::Config {
    let mut preferred = russh::Preferred::DEFAULT.clone();
    preferred.compression = std::borrow::Cow::Borrowed(&[russh::compression::NONE]);
    // Host key types on file go first, as OpenSSH orders them, so a known
    // host is asked for the key that can be checked.
    if !known_algorithms.is_empty() {
        let mut keys = known_algorithms;
        for a in preferred.key.iter() {
            if !keys.contains(a) {
                keys.push(a.clone());
            }
        }
        preferred.key = std::borrow::Cow::Owned(keys);
    }
    client::Config {
        window_size: WINDOW_BYTES,
        maximum_packet_size: PACKET_BYTES_MAX,
        channel_buffer_size: CHANNEL_QUEUE_LEN,
        preferred,
        keepalive_interval: Some(Duration::from_millis(opts.keepalive_interval_ms.max(1))),
        keepalive_max: opts.keepalive_max,
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    }
}

/// Checks the host key while russh's key exchange runs, keeping the
/// verdict so the caller can say precisely why a key was refused.
pub struct HostKeyCheck {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    refusal: Arc<Mutex<Option<SshError>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            self.refuse(SshError::Protocol {
                host: self.host.clone(),
                port: self.port,
                reason: "the host presented a certificate; host certificates are not supported, only known_hosts keys"
                    .into(),
            });
            return Ok(false);
        };
        match self.verdict(key) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.refuse(e);
                Ok(false)
            }
        }
    }
}

impl HostKeyCheck {
    fn refuse(&self, e: SshError) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn verdict(&self, key: &PublicKey) -> Result<(), SshError> {
        let name = known_hosts::host_port_name(&self.host, self.port);
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let path = &self.known_hosts;
        let io = |source| SshError::KnownHosts { path: path.clone(), source };
        match known_hosts::check(path, &self.host, self.port, key).map_err(io)? {
            known_hosts::Verdict::Known => Ok(()),
            known_hosts::Verdict::Changed { line } => {
                Err(SshError::ChangedHostKey { name, known_hosts: path.clone(), line, fingerprint })
            }
            known_hosts::Verdict::Revoked { line } => {
                Err(SshError::RevokedHostKey { name, known_hosts: path.clone(), line, fingerprint })
            }
            known_hosts::Verdict::Unknown { other_types } => match self.policy {
                HostKeyPolicy::AcceptNew if other_types.is_empty() => {
                    let line = known_hosts::learn(path, &self.host, self.port, key).map_err(io)?;
                    tracing::warn!(host = name, %fingerprint, known_hosts = %path.display(), line, "learned a new host key (accept-new)");
                    Ok(())
                }
                _ => Err(SshError::UnknownHostKey {
                    line: known_hosts::keyscan_line(&self.host, self.port, key),
                    name,
                    host: self.host.clone(),
                    port: self.port,
                    known_hosts: path.clone(),
                    fingerprint,
                    other_types,
                }),
            },
        }
    }
}

/// SSH over `stream` to the resolved host: key exchange, host key, authentication.
async fn session<S>(stream: S, r: &config::Resolved, opts: &Options) -> Result<Handle<HostKeyCheck>, SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let refusal = Arc::new(Mutex::new(None));
    let check = HostKeyCheck {
        host: r.host_name.clone(),
        port: r.port,
        known_hosts: opts.known_hosts.clone(),
        policy: opts.host_keys,
        refusal: refusal.clone(),
    };
    let known = known_hosts::recorded_algorithms(&opts.known_hosts, &r.host_name, r.port);
    let config = Arc::new(client_config(opts, known));
    let protocol =
        |e: russh::Error| SshError::Protocol { host: r.host_name.clone(), port: r.port, reason: e.to_string() };
    let connected = tokio::time::timeout(
        Duration::from_millis(opts.connect_timeout_ms),
        client::connect_stream(config, stream, check),
    )
    .await
    .map_err(|_| SshError::Timeout {
        what: "the SSH key exchange",
        host: r.host_name.clone(),
        port: r.port,
        timeout_ms: opts.connect_timeout_ms,
    })?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            if let Some(refused) = refusal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(refused);
            }
            return Err(protocol(e));
        }
    };
    authenticate(&mut handle, r, opts).await?;
    Ok(handle)
}

/// Offers, in order: the explicit identity and `IdentityFile`s (or the
/// default `~/.ssh/id_*`), then the ssh-agent's keys.
async fn authenticate(handle: &mut Handle<HostKeyCheck>, r: &config::Resolved, opts: &Options) -> Result<(), SshError> {
    let protocol =
        |e: russh::Error| SshError::Protocol { host: r.host_name.clone(), port: r.port, reason: e.to_string() };
    let rsa_hash = handle.best_supported_rsa_hash().await.map_err(protocol)?.flatten();
    let mut tried = Vec::new();
    for path in &r.identities {
        let key = load_key(path, opts.passphrase_file.as_deref(), opts.passphrase.as_deref())?;
        let alg = key.algorithm().to_string();
        let key = PrivateKeyWithHashAlg::new(Arc::new(key), rsa_hash);
        let result = handle.authenticate_publickey(r.user.clone(), key).await.map_err(protocol)?;
        if result.success() {
            return Ok(());
        }
        tried.push(format!("key {} ({alg}): refused", path.display()));
    }
    if let Some(sock) = &opts.agent_socket {
        match russh::keys::agent::client::AgentClient::connect_uds(sock).await {
            Ok(mut agent) => {
                let identities = agent.request_identities().await.unwrap_or_default();
                if identities.is_empty() {
                    tried.push(format!("ssh-agent at {}: holds no key", sock.display()));
                }
                for id in identities {
                    let russh::keys::agent::AgentIdentity::PublicKey { key, comment } = id else { continue };
                    let alg = key.algorithm().to_string();
                    let hash =
                        if matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }) { rsa_hash } else { None };
                    match handle.authenticate_publickey_with(r.user.clone(), key, hash, &mut agent).await {
                        Ok(result) if result.success() => return Ok(()),
                        Ok(_) => tried.push(format!("ssh-agent key `{comment}` ({alg}): refused")),
                        Err(e) => {
                            tried.push(format!("ssh-agent key `{comment}` ({alg}): the agent failed to sign: {e}"))
                        }
                    }
                }
            }
            Err(e) => tried.push(format!("ssh-agent at {}: cannot connect: {e}", sock.display())),
        }
    }
    Err(SshError::AuthRefused { user: r.user.clone(), host: r.host_name.clone(), port: r.port, tried })
}

fn load_key(
    path: &Path,
    passphrase_file: Option<&Path>,
    typed: Option<&str>,
) -> Result<russh::keys::PrivateKey, SshError> {
    let bad = |reason: String| SshError::BadKey { key: path.to_path_buf(), reason };
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            let Some(pf) = passphrase_file else {
                let Some(typed) = typed else {
                    return Err(SshError::KeyNeedsPassphrase { key: path.to_path_buf() });
                };
                return russh::keys::load_secret_key(path, Some(typed))
                    .map_err(|_| SshError::WrongTypedPassphrase { key: path.to_path_buf() });
            };
            let text = read_secret(pf).map_err(|e| match e {
                SecretError::Io(e) => bad(format!("cannot read its passphrase file {}: {e}", pf.display())),
                SecretError::Open(mode) => SshError::PassphraseFileOpen { passphrase_file: pf.to_path_buf(), mode },
            })?;
            let passphrase = text.strip_suffix('\n').unwrap_or(&text);
            let passphrase = passphrase.strip_suffix('\r').unwrap_or(passphrase);
            russh::keys::load_secret_key(path, Some(passphrase))
                .map_err(|_| SshError::WrongPassphrase { key: path.to_path_buf(), passphrase_file: pf.to_path_buf() })
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

enum SecretError {
    Io(std::io::Error),
    Open(u32),
}

/// A secret's file, refused when its group or others may read it (as OpenSSH refuses such a key).
fn read_secret(path: &Path) -> Result<String, SecretError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::File::open(path).map_err(SecretError::Io)?;
    let mode = file.metadata().map_err(SecretError::Io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Open(mode));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(SecretError::Io)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_user_and_port() {
        let t = Target::parse("ssh://ops@gpu-3:2222").unwrap();
        assert_eq!(t, Target { user: Some("ops".into()), host: "gpu-3".into(), port: Some(2222) });
        assert_eq!(t.to_string(), "ssh://ops@gpu-3:2222");
        assert_eq!(Target::parse("ssh://gpu-3").unwrap(), Target { user: None, host: "gpu-3".into(), port: None });
        let v6 = Target::parse("ssh://u@[::1]:22").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", Some(22)));
        assert_eq!(v6.to_string(), "ssh://u@[::1]:22");
        for (bad, says) in
            [("gpu-3", "ssh://USER@HOST"), ("ssh://@h", "user"), ("ssh://u@h:0", "port"), ("ssh://u@:22", "no host")]
        {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
