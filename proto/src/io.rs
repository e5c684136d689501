//! Framed, typed message I/O over any async byte stream.

use crate::codec::{self, CodecError};
use crate::frame::{FrameDecoder, FrameError, encode_frame};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// Any byte stream a connection can run over: TCP, a Unix socket, an SSH
/// channel, an in-memory pipe. Both ends hold connections as [`BoxStream`]s,
/// so nothing past the opening of a stream knows which transport it is.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// A byte stream of any transport.
pub type BoxStream = Box<dyn ByteStream>;

/// Initial read buffer; grows only as far as the frames that arrive need.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Receiving a message failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The byte stream did not hold a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame did not hold a valid message.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl crate::retry::Classify for RecvError {
    /// Whether reconnecting may help: transport failures yes, a peer that
    /// speaks garbage no.
    fn retry(&self) -> crate::retry::Retry {
        crate::retry::Retry::when(match self {
            RecvError::Frame(e) => e.is_retryable(),
            RecvError::Codec(_) => false,
        })
    }
}

/// Sending a message failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The message is larger than a frame may be, or the transport failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl crate::retry::Classify for SendError {
    /// Whether reconnecting may help.
    fn retry(&self) -> crate::retry::Retry {
        crate::retry::Retry::when(match self {
            SendError::Frame(e) => e.is_retryable(),
            SendError::Codec(_) => false,
        })
    }
}

/// Reads frames and messages from a byte stream.
///
/// [`FrameReader::read_frame`] is cancel-safe: bytes read so far stay in the
/// buffer, so it can sit in a `tokio::select!` next to timers.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames over `frame_bytes_max`.
    pub fn new(inner: R, frame_bytes_max: u32) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            decoder: FrameDecoder::new(frame_bytes_max),
        }
    }

    /// The largest frame accepted now.
    pub fn frame_bytes_max(&self) -> u32 {
        self.decoder.frame_bytes_max()
    }

    /// Changes the largest frame accepted from now on (the handshake reads with a small one).
    pub fn set_max_frame_bytes(&mut self, frame_bytes_max: u32) {
        self.decoder = FrameDecoder::new(frame_bytes_max);
    }

    /// The next frame's payload; `None` when the peer closed cleanly between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return self.decoder.decode_eof(&mut self.buf);
            }
        }
    }

    /// The next message; `None` when the peer closed cleanly.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, RecvError> {
        match self.read_frame().await? {
            Some(frame) => Ok(Some(codec::decode(&frame)?)),
            None => Ok(None),
        }
    }
}

/// Writes frames and messages to a byte stream.
///
/// Sending is not cancel-safe: a send dropped half-way leaves a partial frame,
/// and the connection must then be closed.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: BytesMut,
    scratch: Vec<u8>,
    /// Frames [`FrameWriter::queue`] encoded and [`FrameWriter::flush_queued`] has not written yet.
    queued: BytesMut,
    frame_bytes_max: u32,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer that refuses to send frames over `frame_bytes_max`.
    pub fn new(inner: W, frame_bytes_max: u32) -> FrameWriter<W> {
        FrameWriter { inner, buf: BytesMut::new(), scratch: Vec::new(), queued: BytesMut::new(), frame_bytes_max }
    }

    /// Writes one frame and flushes it (after any frames queued before it).
    pub async fn write_frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        if !self.queued.is_empty() {
            encode_frame(payload, self.frame_bytes_max, &mut self.queued)?;
            return self.flush_queued().await;
        }
        self.buf.clear();
        encode_frame(payload, self.frame_bytes_max, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Encodes and sends one message.
    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), SendError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let result = match codec::encode_into(msg, &mut scratch) {
            Ok(()) => self.write_frame(&scratch).await.map_err(SendError::from),
            Err(e) => Err(e.into()),
        };
        self.scratch = scratch;
        result
    }

    /// Encodes one message as a frame behind those already queued and writes nothing:
    /// [`FrameWriter::flush_queued`] sends them all in one write. A writer with a burst of
    /// messages queued saves a system call per message (on loopback, also the peer's
    /// receive path, which the sender's call runs). A message that does not encode, or
    /// whose frame is over the bound, is refused and queues nothing.
    pub fn queue<M: Serialize>(&mut self, msg: &M) -> Result<(), SendError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let result = match codec::encode_into(msg, &mut scratch) {
            Ok(()) => encode_frame(&scratch, self.frame_bytes_max, &mut self.queued).map_err(SendError::from),
            Err(e) => Err(e.into()),
        };
        self.scratch = scratch;
        result
    }

    /// Bytes [`FrameWriter::queue`] holds that are not written yet.
    pub fn queued_bytes(&self) -> usize {
        self.queued.len()
    }

    /// Writes the queued frames, in order, and flushes.
    pub async fn flush_queued(&mut self) -> Result<(), FrameError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.inner.write_all(&self.queued).await?;
        self.queued.clear();
        self.inner.flush().await?;
        Ok(())
    }

    /// Shuts the write side down, telling the peer no more frames will come.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown().await
    }
}

/// Both directions of one byte stream.
#[derive(Debug)]
pub struct Connection<T> {
    /// The receiving side.
    pub reader: FrameReader<ReadHalf<T>>,
    /// The sending side.
    pub writer: FrameWriter<WriteHalf<T>>,
}

impl<T: AsyncRead + AsyncWrite> Connection<T> {
    /// Wraps `stream`, refusing frames over `frame_bytes_max` in both directions.
    pub fn new(stream: T, frame_bytes_max: u32) -> Connection<T> {
        let (read, write) = tokio::io::split(stream);
        Connection { reader: FrameReader::new(read, frame_bytes_max), writer: FrameWriter::new(write, frame_bytes_max) }
    }

    /// Splits into halves that separate tasks can own.
    pub fn split(self) -> (FrameReader<ReadHalf<T>>, FrameWriter<WriteHalf<T>>) {
        (self.reader, self.writer)
    }
}
