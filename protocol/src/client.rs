//! Async client over the daemon's Unix socket: connect and handshake, send requests, read events.
//! Split it into reader and writer halves to cancel a request while its events stream in.

use std::path::Path;

use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::frame::{FrameError, FrameReader, write_frame};
use crate::types::{Event, ModelInfo, Request};
use crate::{MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the daemon at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The daemon sent something that is not an event.
    #[error("daemon sent an unparsable event ({0}): {1}")]
    BadEvent(serde_json::Error, String),
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The daemon closed the connection.
    #[error("the daemon closed the connection")]
    Closed,
}

/// Reading half of a connection.
#[derive(Debug)]
pub struct ClientReader {
    frames: FrameReader<BufReader<OwnedReadHalf>>,
}

/// Writing half of a connection.
#[derive(Debug)]
pub struct ClientWriter {
    half: OwnedWriteHalf,
}

/// A connection to `m31rd`.
#[derive(Debug)]
pub struct Client {
    reader: ClientReader,
    writer: ClientWriter,
}

impl Client {
    /// Connects to the socket at `path` without the handshake (tests of bad handshakes use this).
    pub async fn connect_raw(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        let (read, write) = stream.into_split();
        Ok(Self {
            reader: ClientReader {
                frames: FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES),
            },
            writer: ClientWriter { half: write },
        })
    }

    /// Connects and performs the `hello` handshake; returns the client and the loaded model.
    pub async fn connect(path: &Path, client_name: &str) -> Result<(Self, ModelInfo), ClientError> {
        let mut client = Self::connect_raw(path).await?;
        client
            .send(&Request::Hello { version: PROTOCOL_VERSION, client: client_name.into() })
            .await?;
        match client.next_event().await? {
            Some(Event::Hello { version, model, .. }) if version == PROTOCOL_VERSION => {
                Ok((client, model))
            }
            Some(Event::Hello { version, .. }) => Err(ClientError::Handshake(format!(
                "daemon speaks protocol {version}, this client {PROTOCOL_VERSION}"
            ))),
            Some(Event::Error { message, .. }) => Err(ClientError::Handshake(message)),
            Some(other) => Err(ClientError::Handshake(format!("unexpected reply {other:?}"))),
            None => Err(ClientError::Closed),
        }
    }

    /// Sends one request.
    pub async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.writer.send(request).await
    }

    /// The next event; `None` when the daemon closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        self.reader.next_event().await
    }

    /// Sends `request` and collects its events until its `done` or `error`, calling `on_token`
    /// for each piece of text. Events of other requests are skipped.
    pub async fn run(
        &mut self,
        request: &Request,
        mut on_token: impl FnMut(&str),
    ) -> Result<Event, ClientError> {
        let id = request.id().map(str::to_owned);
        self.send(request).await?;
        loop {
            let event = self.next_event().await?.ok_or(ClientError::Closed)?;
            match &event {
                Event::Token { id: eid, text, .. } if Some(eid) == id.as_ref() => on_token(text),
                Event::Done { id: eid, .. }
                | Event::Status { id: eid, .. }
                | Event::ShuttingDown { id: eid }
                    if Some(eid) == id.as_ref() =>
                {
                    return Ok(event);
                }
                Event::Error { id: eid, .. } if eid.is_none() || eid == &id => return Ok(event),
                _ => {}
            }
        }
    }

    /// Splits into halves that can be used from different tasks.
    pub fn split(self) -> (ClientReader, ClientWriter) {
        (self.reader, self.writer)
    }

    /// Writes raw bytes (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        use tokio::io::AsyncWriteExt;
        self.writer.half.write_all(bytes).await.map_err(FrameError::Io)?;
        Ok(())
    }
}

impl ClientReader {
    /// The next event; `None` when the daemon closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        let Some(frame) = self.frames.next_frame().await? else {
            return Ok(None);
        };
        serde_json::from_str(&frame).map(Some).map_err(|e| ClientError::BadEvent(e, frame))
    }
}

impl ClientWriter {
    /// Sends one request.
    pub async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        write_frame(&mut self.half, request).await.map_err(|e| FrameError::Io(e).into())
    }
}
