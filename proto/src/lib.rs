//! Wire protocol between the Cosmos controller and its agents.
//!
//! The crate is split so that protocol logic does no I/O (in the manner of
//! quinn-proto): [`frame`] turns bytes into frames, [`codec`] turns frames into
//! messages, [`handshake`] decides whether a peer may talk to us. Only [`io`]
//! touches a transport, and it works over any `AsyncRead + AsyncWrite`, so the
//! same code serves in-memory pipes, TCP and SSH channels.

pub mod codec;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod io;
pub mod msg;
pub mod retry;
pub mod spec;

pub use codec::CodecError;
pub use frame::{FrameDecoder, FrameError};
pub use handshake::{HandshakeError, Hello, HelloReply, Refusal, Role, Token, TokenFileError};
pub use ids::{AttemptId, Epoch, JobId, Sha256};
pub use io::{BoxStream, ByteStream, Connection, FrameReader, FrameWriter, RecvError, SendError};
pub use msg::*;
pub use retry::{Classify, Retry};
pub use spec::{ArtifactRef, InputArtifact, JobSpec, Mount, OutputArtifact, SpecError};

/// Version of the protocol this build speaks; peers must match exactly.
///
/// Bump it on any change to a message's encoding: bincode is not
/// self-describing, so there is no partial compatibility to rely on.
/// `tests/wire_fixtures.rs` fails on any such change until it is bumped and the
/// new version's golden bytes are written (`COSMOS_BLESS_FIXTURES=1`).
/// v2: blob frames (inputs and outputs in checksummed chunks).
/// v3: a handshake refusal for a node id already connected; `JobSpec::terminal_exit_codes`.
/// v4: `GpuUsage::quarantine` (why a GPU is out of scheduling); `ControllerMsg::ReleaseGpu`.
pub const PROTOCOL_VERSION: u16 = 4;
