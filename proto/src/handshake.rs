//! The first exchange on every connection: who is speaking, which protocol
//! version, and whether they may talk to us.
//!
//! A handshake frame's payload is `MAGIC`, the sender's protocol version
//! (u16, big-endian), then the encoded body. The version comes before the
//! body so a peer of another version is told so plainly rather than failing
//! to decode a body whose layout it does not know.

use crate::PROTOCOL_VERSION;
use crate::codec::{self, CodecError};
use crate::frame::FrameError;
use crate::io::Connection;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// First bytes of every handshake: tells our peers from anything else that
/// connects to the port (a port scanner, an HTTP client, a wrong service).
pub const MAGIC: [u8; 4] = *b"CSMO";
/// Bytes before the body: magic and version.
const HEADER_BYTES: usize = MAGIC.len() + 2;
/// Default bound on the whole handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Longest node id accepted.
pub const NODE_ID_BYTES_MAX: usize = 253;
/// Largest handshake frame either side reads: a hello is a few hundred bytes,
/// and a peer that has not yet proved who it is must not make us reserve more.
pub const HELLO_FRAME_BYTES_MAX: u32 = 4096;
/// Shortest token a token file may hold (the generated ones have 64 characters).
pub const TOKEN_CHARS_MIN: usize = 32;

/// Which side of the protocol a peer plays.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A GPU host's agent.
    Agent,
    /// The controller.
    Controller,
}

/// A shared secret. Its `Debug` form hides the value so it never reaches a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Compares in time independent of where the values differ, so the
    /// comparison does not leak the token to a peer timing its refusals.
    pub fn matches(&self, other: &Token) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().max(b.len()) {
            let x = a.get(i).copied().unwrap_or(0);
            let y = b.get(i).copied().unwrap_or(0);
            diff |= usize::from(x ^ y);
        }
        diff == 0
    }
}

/// The connecting side's opening message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// What the sender is.
    pub role: Role,
    /// The sender's name (an agent's host name).
    pub node_id: String,
    /// Shared token; may be empty where the transport authenticates (SSH).
    pub token: Token,
    /// Differs at every start of the sender's process: the controller tells
    /// an agent reconnecting from another process under the same name.
    pub incarnation: u64,
}

/// The accepting side's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Go ahead.
    Accepted {
        /// The accepting side's name.
        node_id: String,
    },
    /// Closed after this reply.
    Refused(Refusal),
}

/// Why a handshake was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The two sides speak different protocol versions.
    #[error(
        "protocol version mismatch: controller speaks v{controller}, agent speaks v{agent}; run the same cosmos release on both"
    )]
    VersionMismatch {
        /// The controller's version.
        controller: u16,
        /// The agent's version.
        agent: u16,
    },
    /// The token does not match.
    #[error(
        "token refused: the agent's token file does not match the controller's agent token (see the controller's data directory)"
    )]
    BadToken,
    /// The peer is not of the role expected on this port.
    #[error("expected a {expected:?} on this port, got a {got:?}")]
    WrongRole {
        /// The role this port serves.
        expected: Role,
        /// The role that connected.
        got: Role,
    },
    /// The node id is empty, too long or not printable.
    #[error("node id `{0}` is not acceptable: use 1 to 253 printable characters without spaces")]
    BadNodeId(String),
    /// Any other reason, in words.
    #[error("{0}")]
    Other(String),
    /// Another live connection already speaks under this node id.
    #[error(
        "another agent named `{name}` is connected (from {holder}); give this one another --name, or stop the other first"
    )]
    NameInUse {
        /// The node id.
        name: String,
        /// Where the connection holding it comes from.
        holder: String,
    },
}

/// The handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer does not speak this protocol at all.
    #[error("peer does not speak the cosmos protocol (bad magic bytes); is this the controller's agent port?")]
    BadMagic,
    /// The peer speaks another version.
    #[error("peer speaks protocol v{theirs}, this build speaks v{ours}; run the same cosmos release on both")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The handshake frame was shorter than its header.
    #[error("handshake truncated: {len} bytes, need at least {HEADER_BYTES}")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The other side refused us.
    #[error("refused by peer: {0}")]
    Refused(Refusal),
    /// We refused the other side (and told it why).
    #[error("refused peer: {0}")]
    RefusedPeer(Refusal),
    /// The body did not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Framing or transport failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed before the handshake finished.
    #[error("peer closed the connection during the handshake")]
    Closed,
    /// The handshake took longer than allowed.
    #[error("handshake timed out after {timeout_ms} ms")]
    Timeout {
        /// The bound in force.
        timeout_ms: u64,
    },
}

impl crate::retry::Classify for HandshakeError {
    /// Whether trying again later may succeed without someone changing a configuration.
    fn retry(&self) -> crate::retry::Retry {
        crate::retry::Retry::when(match self {
            HandshakeError::Frame(e) => e.is_retryable(),
            HandshakeError::Closed | HandshakeError::Timeout { .. } => true,
            _ => false,
        })
    }
}

/// Encodes a handshake payload: magic, our version, body.
pub fn encode_payload<T: Serialize>(body: &T) -> Result<Vec<u8>, CodecError> {
    encode_payload_with_version(body, PROTOCOL_VERSION)
}

/// Like [`encode_payload`] with a chosen version, to test how a peer of another release is treated.
pub fn encode_payload_with_version<T: Serialize>(body: &T, version: u16) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    codec::encode_into(body, &mut out)?;
    Ok(out)
}

/// Checks magic and version, then decodes the body.
pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, HandshakeError> {
    if payload.len() < HEADER_BYTES {
        return Err(if payload.len() >= MAGIC.len() && payload[..MAGIC.len()] != MAGIC {
            HandshakeError::BadMagic
        } else {
            HandshakeError::Truncated { len: payload.len() }
        });
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let theirs = u16::from_be_bytes([payload[4], payload[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs });
    }
    Ok(codec::decode(&payload[HEADER_BYTES..])?)
}

/// The accepting side's decision on a hello, with no I/O.
pub fn check_hello(hello: &Hello, expected_role: Role, expected_token: &Token) -> Result<(), Refusal> {
    if hello.role != expected_role {
        return Err(Refusal::WrongRole { expected: expected_role, got: hello.role });
    }
    let id = &hello.node_id;
    if id.is_empty() || id.len() > NODE_ID_BYTES_MAX || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Refusal::BadNodeId(id.chars().take(64).collect()));
    }
    if !expected_token.matches(&hello.token) {
        return Err(Refusal::BadToken);
    }
    Ok(())
}

/// Runs the connecting side: sends `hello`, returns the peer's node id once accepted.
pub async fn connect<T: AsyncRead + AsyncWrite>(
    conn: &mut Connection<T>,
    hello: &Hello,
    timeout_ms: u64,
) -> Result<String, HandshakeError> {
    with_timeout(timeout_ms, async {
        conn.writer.write_frame(&encode_payload(hello)?).await?;
        let payload = read_handshake_frame(conn).await?;
        match decode_payload::<HelloReply>(&payload)? {
            HelloReply::Accepted { node_id } => Ok(node_id),
            HelloReply::Refused(refusal) => Err(HandshakeError::Refused(refusal)),
        }
    })
    .await
}

/// Runs the accepting side: reads a hello, answers it, returns it once accepted.
///
/// A refused peer is told why before the error is returned, including a peer
/// of another version (the reply's header carries our version, which that
/// peer can read whatever its body layout).
pub async fn accept<T: AsyncRead + AsyncWrite>(
    conn: &mut Connection<T>,
    our_node_id: &str,
    expected_role: Role,
    expected_token: &Token,
    timeout_ms: u64,
) -> Result<Hello, HandshakeError> {
    accept_checked(conn, our_node_id, expected_role, expected_token, timeout_ms, |_| async { Ok(()) }).await
}

/// Like [`accept`], with one more decision taken on an authenticated hello
/// before it is answered (the controller refuses a node id already connected).
pub async fn accept_checked<T, F, Fut>(
    conn: &mut Connection<T>,
    our_node_id: &str,
    expected_role: Role,
    expected_token: &Token,
    timeout_ms: u64,
    check: F,
) -> Result<Hello, HandshakeError>
where
    T: AsyncRead + AsyncWrite,
    F: FnOnce(Hello) -> Fut,
    Fut: Future<Output = Result<(), Refusal>>,
{
    with_timeout(timeout_ms, async {
        let payload = read_handshake_frame(conn).await?;
        let refusal = match decode_payload::<Hello>(&payload) {
            Ok(hello) => match check_hello(&hello, expected_role, expected_token) {
                Ok(()) => match check(hello.clone()).await {
                    Ok(()) => {
                        let reply = HelloReply::Accepted { node_id: our_node_id.to_string() };
                        conn.writer.write_frame(&encode_payload(&reply)?).await?;
                        return Ok(hello);
                    }
                    Err(refusal) => refusal,
                },
                Err(refusal) => refusal,
            },
            Err(HandshakeError::VersionMismatch { ours, theirs }) => {
                // The roles are fixed by who accepts: the controller accepts agents.
                let (controller, agent) = if expected_role == Role::Agent { (ours, theirs) } else { (theirs, ours) };
                Refusal::VersionMismatch { controller, agent }
            }
            Err(other) => return Err(other),
        };
        let reply = HelloReply::Refused(refusal.clone());
        // Best effort: the peer may already be gone, and we refuse it either way.
        let _ = conn.writer.write_frame(&encode_payload(&reply)?).await;
        Err(HandshakeError::RefusedPeer(refusal))
    })
    .await
}

/// The listening agent's side when the controller dials it (an SSH channel
/// to the agent's socket): the controller proves first that it holds the
/// agent token, so the agent never shows its token to whoever reaches its
/// socket; then the agent opens the usual handshake as if it had dialed, and
/// the controller answers it exactly as on its own port. `check` decides on
/// the controller's authenticated hello before it is answered (the agent
/// refuses a second controller). Returns the controller's node id.
pub async fn answer_controller<T, F, Fut>(
    conn: &mut Connection<T>,
    agent_hello: &Hello,
    token: &Token,
    timeout_ms: u64,
    check: F,
) -> Result<String, HandshakeError>
where
    T: AsyncRead + AsyncWrite,
    F: FnOnce(Hello) -> Fut,
    Fut: Future<Output = Result<(), Refusal>>,
{
    let controller = accept_checked(conn, &agent_hello.node_id, Role::Controller, token, timeout_ms, check).await?;
    connect(conn, agent_hello, timeout_ms).await?;
    Ok(controller.node_id)
}

/// The controller's first step on a stream it opened to a listening agent:
/// proves it holds the agent token (see [`answer_controller`]). The agent's
/// own hello follows, to be answered with [`accept_checked`] as on the
/// controller's port. Returns the agent's node id.
pub async fn dial_agent<T: AsyncRead + AsyncWrite>(
    conn: &mut Connection<T>,
    controller_hello: &Hello,
    timeout_ms: u64,
) -> Result<String, HandshakeError> {
    connect(conn, controller_hello, timeout_ms).await
}

/// A first frame too large to be a hello means the peer speaks something
/// else (an HTTP request's `GET ` reads as a 1.2 GB length).
///
/// The frame limit is [`HELLO_FRAME_BYTES_MAX`] while it is read, whatever the
/// connection's own limit: an unauthenticated peer cannot make us reserve a
/// full-size frame.
async fn read_handshake_frame<T: AsyncRead + AsyncWrite>(
    conn: &mut Connection<T>,
) -> Result<bytes::Bytes, HandshakeError> {
    let limit = conn.reader.frame_bytes_max();
    conn.reader.set_max_frame_bytes(limit.min(HELLO_FRAME_BYTES_MAX));
    let read = conn.reader.read_frame().await;
    conn.reader.set_max_frame_bytes(limit);
    match read {
        Ok(Some(payload)) => Ok(payload),
        Ok(None) => Err(HandshakeError::Closed),
        Err(FrameError::Oversized { .. }) => Err(HandshakeError::BadMagic),
        Err(e) => Err(e.into()),
    }
}

async fn with_timeout<T>(
    timeout_ms: u64,
    fut: impl Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    tokio::time::timeout(Duration::from_millis(timeout_ms), fut)
        .await
        .unwrap_or(Err(HandshakeError::Timeout { timeout_ms }))
}

/// A token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Reading or writing it failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may read it: the token is as good as public.
    #[error("token file {path} is readable by group or others (mode {mode:o}); make it private: chmod 600 {path}")]
    TooOpen {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It holds no token, or one too short to be a secret.
    #[error(
        "token file {path} holds {chars} characters; a token needs at least {TOKEN_CHARS_MIN}: copy the file the controller generated (the controller makes a new one if its own is removed)"
    )]
    TooShort {
        /// The file.
        path: std::path::PathBuf,
        /// Characters it holds, white space trimmed.
        chars: usize,
    },
}

impl Token {
    /// Reads a token file, refusing one that is empty, too short, or readable by group or others.
    pub fn read_file(path: &std::path::Path) -> Result<Token, TokenFileError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| TokenFileError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::TooOpen { path: path.to_path_buf(), mode });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, 4096), &mut text).map_err(io)?;
        let token = text.trim();
        if token.chars().count() < TOKEN_CHARS_MIN {
            return Err(TokenFileError::TooShort { path: path.to_path_buf(), chars: token.chars().count() });
        }
        Ok(Token(token.to_string()))
    }

    /// Writes `self` to a new file readable by its owner only: through a
    /// temporary file, synced, then renamed, so a crash never leaves a partial token.
    pub fn write_file(&self, path: &std::path::Path) -> Result<(), TokenFileError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| TokenFileError::Io { path: path.to_path_buf(), source };
        let tmp = path.with_extension("token-tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        writeln!(f, "{}", self.0).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}
