//! Connection limits: a client that does not read is no longer read, idle connections time out,
//! and a full house of idle connections makes room for a new client.

use std::time::Duration;

use m31r_protocol::{Client, DaemonStatus, ErrorCode, Event, PROTOCOL_VERSION, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::common::{Daemon, long_prompt};

/// Generous: the machine running the tests may be busy.
const PATIENCE: Duration = Duration::from_secs(30);

async fn status(client: &mut Client) -> DaemonStatus {
    match client.run(&Request::Status { id: "s".into() }, |_| {}).await.unwrap() {
        Event::Status { status, .. } => status,
        other => panic!("expected status, got {other:?}"),
    }
}

/// Polls `status` until `open` connections are reported (the asking one included).
async fn wait_for_connections(daemon: &Daemon, client: &mut Client, open: u32) {
    let until = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = status(client).await.connections;
        if now == open {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{now} connections, expected {open}: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hello() -> String {
    let hello = Request::Hello { version: PROTOCOL_VERSION, client: "raw".into() };
    format!("{}\n", serde_json::to_string(&hello).unwrap())
}

/// A raw, greeted connection and its line reader.
async fn raw_client(
    daemon: &Daemon,
) -> (BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf) {
    let (read, mut write) = UnixStream::connect(&daemon.socket).await.unwrap().into_split();
    write.write_all(hello().as_bytes()).await.unwrap();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert!(line.contains("\"hello\""), "{line}");
    (read, write)
}

/// Reads lines until the daemon closes the connection; panics if it stays open.
async fn expect_closed(read: &mut BufReader<tokio::net::unix::OwnedReadHalf>, what: &str) {
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut line = String::new();
        loop {
            line.clear();
            match read.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what} was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_no_longer_read_and_is_released_when_it_closes() {
    let daemon = Daemon::start(&[]);
    let mut other = daemon.client().await;
    let mut hog = UnixStream::connect(&daemon.socket).await.unwrap();
    let batch = hello() + &"{\"type\":\"status\",\"id\":\"x\"}\n".repeat(100);
    // Unbounded, the daemon would read (and queue answers to) all of these.
    let limit = 100_000;
    let mut sent = 0;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_secs(3), hog.write_all(batch.as_bytes())).await {
            Ok(written) => written.unwrap(),
            Err(_) => break true,
        }
        sent += 100;
        if sent >= limit {
            break false;
        }
    };
    assert!(blocked, "the daemon read {sent} requests from a client that reads no answers");
    eprintln!("blocked after {sent} requests");

    // Other clients are served meanwhile.
    let now = status(&mut other).await;
    assert_eq!(now.connections, 2);
    let outcome = other.run(&crate::common::generate("g", "fn main() {", 4), |_| {}).await.unwrap();
    assert!(matches!(outcome, Event::Done { .. }), "{outcome:?}");

    // Closing the hog releases its connection.
    drop(hog);
    wait_for_connections(&daemon, &mut other, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_per_connection_are_bounded() {
    let daemon = Daemon::start(&[("M31R_QUEUE_LEN", "256")]);
    let (mut read, mut write) = raw_client(&daemon).await;
    let long = long_prompt();
    let n = 120;
    let requests: String = (0..n)
        .map(|i| {
            // A distinct start defeats the prefix cache, so every request costs a full prefill.
            let request = crate::common::generate(&i.to_string(), &format!("// {i}\n{long}"), 64);
            format!("{}\n", serde_json::to_string(&request).unwrap())
        })
        .collect();
    let writer = tokio::spawn(async move {
        write.write_all(requests.as_bytes()).await.unwrap();
        write
    });
    let (mut ended, mut refused) = (0, 0);
    let mut line = String::new();
    while ended < n {
        line.clear();
        let read_one = tokio::time::timeout(PATIENCE * 4, read.read_line(&mut line)).await;
        assert!(read_one.expect("no event in time").unwrap() > 0, "closed after {ended} ends");
        match serde_json::from_str::<Event>(&line).unwrap() {
            Event::Done { .. } => ended += 1,
            Event::Error { code: ErrorCode::Overloaded, message, .. } => {
                assert!(message.contains("in flight on this connection"), "{message}");
                ended += 1;
                refused += 1;
            }
            Event::Error { code, message, .. } => panic!("{code:?}: {message}"),
            _ => {}
        }
    }
    drop(writer.await.unwrap());
    assert!(refused > 0, "{n} requests in flight at once on one connection were all accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_do_not_hold_places_in_flight() {
    // A language server cancels each keystroke's request when the next one comes; the cancelled
    // ones wait in the engine's queue to be dropped, and must not get the next ones refused.
    let daemon = Daemon::start(&[("M31R_QUEUE_LEN", "256")]);
    let (mut read, mut write) = raw_client(&daemon).await;
    let long = long_prompt();
    let n = 3 * m31r_daemon::server::MAX_IN_FLIGHT;
    let mut frames = String::new();
    for i in 0..n {
        // Distinct starts defeat the prefix cache: each request is a full prefill.
        let request = crate::common::generate(&i.to_string(), &format!("// {i}\n{long}"), 64);
        frames.push_str(&serde_json::to_string(&request).unwrap());
        frames.push('\n');
        frames.push_str(&serde_json::to_string(&Request::Cancel { id: i.to_string() }).unwrap());
        frames.push('\n');
    }
    write.write_all(frames.as_bytes()).await.unwrap();
    let (mut ended, mut line) = (0, String::new());
    while ended < n {
        line.clear();
        let read_one = tokio::time::timeout(PATIENCE * 4, read.read_line(&mut line)).await;
        assert!(read_one.expect("no event in time").unwrap() > 0, "closed after {ended} ends");
        match serde_json::from_str::<Event>(&line).unwrap() {
            Event::Done { .. } => ended += 1,
            Event::Error { code, message, .. } => panic!("request refused: {code:?}: {message}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_timeout() {
    let daemon = Daemon::start(&[("M31R_IDLE_TIMEOUT_MS", "300")]);
    let (mut read, _write) = raw_client(&daemon).await;
    expect_closed(&mut read, "an idle connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_house_of_idle_connections_makes_room_by_closing_the_oldest() {
    let daemon = Daemon::start(&[("M31R_MAX_CONNECTIONS", "2"), ("M31R_IDLE_TIMEOUT_MS", "0")]);
    let (mut oldest, _w1) = raw_client(&daemon).await;
    let (mut newer, mut w2) = raw_client(&daemon).await;
    // A request makes `newer` the more recently active one.
    w2.write_all(b"{\"type\":\"status\",\"id\":\"n\"}\n").await.unwrap();
    let mut line = String::new();
    newer.read_line(&mut line).await.unwrap();
    assert!(line.contains("\"status\""), "{line}");

    let mut third = daemon.client().await;
    wait_for_connections(&daemon, &mut third, 2).await;
    expect_closed(&mut oldest, "the oldest idle connection").await;
    w2.write_all(b"{\"type\":\"status\",\"id\":\"n2\"}\n").await.unwrap();
    line.clear();
    newer.read_line(&mut line).await.unwrap();
    assert!(line.contains("\"status\""), "the newer connection was closed too: {line}");
}
