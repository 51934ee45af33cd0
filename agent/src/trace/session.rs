//! One `sidecap trace` connection on the admin endpoint: checks the pod, turns its trace
//! on (through the hub and the agent's loop), streams its records, and ends, switching the
//! trace off, when the CLI closes the stream or its lease runs out.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;

use super::{CONTENT_TYPE, Decoder, Frame, HEARTBEAT, LEASE, TraceHub, frame::encode};
use crate::metrics::PodNames;

/// How long a new session waits for the loop to turn the switch on.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// `pod` from the request's query (`pod=NS/NAME`, `%2F` accepted for the slash).
pub fn pod_of(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("pod="))
        .map(|p| p.replace("%2F", "/").replace("%2f", "/"))
        .filter(|p| !p.is_empty())
}

/// Serves one session on a thread of its own (the admin thread goes back to scrapes).
pub fn start(stream: TcpStream, query: &str, hub: Arc<TraceHub>, names: PodNames) {
    let pod = pod_of(query);
    let spawned = std::thread::Builder::new().name("trace-session".into()).spawn(move || {
        if let Err(e) = serve(stream, pod, &hub, &names) {
            tracing::debug!(error = %e, "trace session ended with an I/O error");
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting a trace session thread");
    }
}

fn refuse(mut stream: TcpStream, status: &str, why: &str) -> std::io::Result<()> {
    let body = format!("{why}\n");
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

fn send(stream: &mut TcpStream, frame: &Frame) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf).map_err(std::io::Error::other)?;
    stream.write_all(&buf)
}

fn serve(mut stream: TcpStream, pod: Option<String>, hub: &Arc<TraceHub>, names: &PodNames) -> std::io::Result<()> {
    let Some(pod) = pod else { return refuse(stream, "400 Bad Request", "want /trace?pod=NAMESPACE/NAME") };
    let managed = names.lock().map(|n| n.values().any(|p| *p == pod)).unwrap_or(false);
    if !managed {
        return refuse(
            stream,
            "404 Not Found",
            &format!("pod {pod} is not captured by this agent (not meshed on this node, or not synced yet)"),
        );
    }
    stream.set_write_timeout(Some(LEASE))?;
    write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nConnection: close\r\n\r\n")?;
    let opened = hub.open(&pod);
    let result = stream_records(&mut stream, &pod, hub, &opened);
    hub.close(opened.id);
    let (reason, records) = match &result {
        Ok(r) => (r.0.clone(), r.1),
        Err(e) => (format!("stream error: {e}"), 0),
    };
    let dropped = opened.dropped.load(Ordering::Relaxed);
    tracing::info!(pod = %pod, reason = %reason, records, dropped, "trace session ended; the pod's trace switch goes off");
    // Best effort: the CLI may be gone.
    let _ = send(&mut stream, &Frame::End { reason, records, dropped });
    let _ = stream.shutdown(Shutdown::Both);
    result.map(|_| ())
}

/// Streams until the CLI goes: (why it ended, records sent).
fn stream_records(stream: &mut TcpStream, pod: &str, hub: &TraceHub, opened: &super::hub::Opened) -> std::io::Result<(String, u64)> {
    if !hub.wait_applied(opened.generation, APPLY_WAIT) {
        return Ok((format!("the agent's loop did not turn the trace on within {APPLY_WAIT:?}"), 0));
    }
    tracing::info!(pod = %pod, "trace session started; the pod's trace switch is on");
    send(stream, &Frame::Started { pod: pod.to_string(), lease_secs: LEASE.as_secs(), rate: hub.rate() })?;

    // The lease: a reader thread watches for heartbeats (or the end of the stream).
    let alive = Arc::new(AtomicBool::new(true));
    let (why_tx, why_rx) = mpsc::channel::<String>();
    let mut reader = stream.try_clone()?;
    reader.set_read_timeout(Some(LEASE))?;
    let flag = alive.clone();
    std::thread::Builder::new().name("trace-lease".into()).spawn(move || {
        let why = watch_lease(&mut reader);
        let _ = why_tx.send(why);
        flag.store(false, Ordering::SeqCst);
    })?;

    let mut sent = 0u64;
    let mut reported = 0u64;
    let mut last_report = Instant::now();
    let mut out = BytesMut::new();
    while alive.load(Ordering::SeqCst) {
        match opened.records.recv_timeout(Duration::from_millis(200)) {
            Ok(first) => {
                out.clear();
                for r in std::iter::once(first).chain(opened.records.try_iter()) {
                    encode(&Frame::Record(r), &mut out).map_err(std::io::Error::other)?;
                    sent += 1;
                }
                stream.write_all(&out)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(("the agent closed the session".into(), sent)),
        }
        let dropped = opened.dropped.load(Ordering::Relaxed);
        if dropped != reported && last_report.elapsed() >= HEARTBEAT {
            send(stream, &Frame::Dropped { count: dropped })?;
            reported = dropped;
            last_report = Instant::now();
        }
    }
    let why = why_rx.recv_timeout(Duration::from_secs(1)).unwrap_or_else(|_| "the CLI went away".into());
    Ok((why, sent))
}

/// Reads the CLI's frames until the stream ends or no heartbeat came for `LEASE`.
fn watch_lease(reader: &mut TcpStream) -> String {
    let mut dec = Decoder::default();
    let mut buf = [0u8; 512];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return "the CLI closed the stream".into(),
            Ok(n) => {
                dec.feed(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(_)) => {} // a heartbeat: the read timeout starts again
                        Ok(None) => break,
                        Err(e) => return format!("the CLI sent a bad frame: {e}"),
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return format!("no heartbeat from the CLI for {}s (lease expired)", LEASE.as_secs());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return format!("the CLI's stream failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pod_of;

    #[test]
    fn the_pod_comes_from_the_query() {
        assert_eq!(pod_of("pod=default/a").as_deref(), Some("default/a"));
        assert_eq!(pod_of("x=1&pod=ns%2Fb").as_deref(), Some("ns/b"));
        assert_eq!(pod_of("pod="), None);
        assert_eq!(pod_of(""), None);
    }
}
