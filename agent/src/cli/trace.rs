//! `sidecap trace --pod NS/NAME [--for DURATION] [--output text|json]`: asks the agent
//! (its admin endpoint) to trace the pod, prints its records as they come, and ends the
//! session on `--for`, Ctrl-C or SIGTERM. The agent also ends it when this process dies
//! (the stream closes) or stops renewing its lease (`trace::LEASE`).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};

use super::OutputFormat;
use crate::trace::{CONTENT_TYPE, Decoder, Frame, FrameError, HEARTBEAT, PATH, frame::encode, record::render_text};

#[derive(Debug, Clone)]
pub struct TraceArgs {
    pub admin: SocketAddr,
    pub pod: String,
    pub duration: Option<Duration>,
    pub output: OutputFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot reach the agent's admin endpoint at {addr} (--admin-addr): {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the agent at {addr} refused to trace {pod}: {message}")]
    Refused { addr: SocketAddr, pod: String, message: String },
    #[error("the agent at {addr} answered without a trace stream: {what}")]
    NotTrace { addr: SocketAddr, what: String },
    #[error("trace stream from {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("trace stream from {addr}: {source}")]
    Frame { addr: SocketAddr, source: FrameError },
    #[error("--for {value:?}: {why} (e.g. 30s, 5m, 1h, 500ms)")]
    Duration { value: String, why: &'static str },
}

/// `30s`, `5m`, `1h`, `500ms`, or plain seconds.
pub fn parse_duration(value: &str) -> Result<Duration, TraceError> {
    let bad = |why| TraceError::Duration { value: value.to_string(), why };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad("not a number followed by a unit"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad("unknown unit")),
    };
    if d.is_zero() {
        return Err(bad("must be more than zero"));
    }
    Ok(d)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// What a finished trace reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub dropped: u64,
    pub reason: String,
}

/// Runs the session; records go to `out`, the summary is returned (the caller prints it).
pub fn trace(args: &TraceArgs, out: &mut dyn Write) -> Result<Summary, TraceError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let addr = args.admin;
    let io = |source| TraceError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|source| TraceError::Connect { addr, source })?;
    stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(io)?;
    write!(stream, "GET {PATH}?pod={} HTTP/1.1\r\nHost: sidecap\r\nAccept: {CONTENT_TYPE}\r\n\r\n", args.pod).map_err(io)?;

    let mut dec = Decoder::default();
    let started = read_head(&mut stream, args, &mut dec)?;
    // Renew the lease until the session ends.
    let done = Arc::new(AtomicBool::new(false));
    let mut beat = stream.try_clone().map_err(io)?;
    let beating = done.clone();
    std::thread::spawn(move || {
        let mut frame = BytesMut::new();
        let _ = encode(&Frame::Heartbeat, &mut frame);
        while !beating.load(Ordering::SeqCst) {
            if beat.write_all(&frame).is_err() {
                return;
            }
            std::thread::sleep(HEARTBEAT);
        }
    });

    let mut summary = Summary::default();
    let mut closing: Option<Instant> = None;
    let mut buf = [0u8; 16 * 1024];
    let result = loop {
        let expired = args.duration.is_some_and(|d| started.elapsed() >= d);
        if closing.is_none() && (expired || STOP.load(Ordering::SeqCst)) {
            // Half-close: the agent ends the session and sends its last report.
            let _ = stream.shutdown(Shutdown::Write);
            done.store(true, Ordering::SeqCst);
            closing = Some(Instant::now());
            summary.reason = if expired { "--for elapsed".into() } else { "stopped".into() };
        }
        if closing.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break Ok(());
        }
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => dec.feed(&buf[..n]),
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) =>
            {
                continue;
            }
            // The agent may reset after its last frame.
            Err(_) if closing.is_some() => break Ok(()),
            Err(e) => break Err(io(e)),
        }
        let mut ended = false;
        loop {
            match dec.next_frame() {
                Ok(Some(Frame::Record(r))) => {
                    summary.records += 1;
                    let line = match args.output {
                        OutputFormat::Json => r.to_string(),
                        OutputFormat::Text => render_text(&r),
                    };
                    // A closed stdout (`| head`) ends the trace like Ctrl-C.
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        STOP.store(true, Ordering::SeqCst);
                    }
                }
                Ok(Some(Frame::Dropped { count })) => {
                    summary.dropped = count;
                    if args.output == OutputFormat::Json {
                        let _ = writeln!(out, "{}", serde_json::json!({ "dropped": count }));
                    }
                }
                Ok(Some(Frame::End { reason, records: _, dropped })) => {
                    summary.dropped = dropped;
                    if summary.reason.is_empty() {
                        summary.reason = reason;
                    }
                    ended = true;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(source) => return Err(TraceError::Frame { addr, source }),
            }
        }
        if ended {
            break Ok(());
        }
    };
    done.store(true, Ordering::SeqCst);
    if summary.reason.is_empty() {
        summary.reason = "the agent closed the stream".into();
    }
    result.map(|()| summary)
}

/// Reads the HTTP answer and the `Started` frame; the time the trace started.
fn read_head(stream: &mut TcpStream, args: &TraceArgs, dec: &mut Decoder) -> Result<Instant, TraceError> {
    let addr = args.admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut head = BytesMut::new();
    let mut buf = [0u8; 4096];
    // The status line and headers, then whatever follows them is frames.
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if Instant::now() > deadline || head.len() > 16 * 1024 {
            return Err(TraceError::NotTrace { addr, what: "no complete answer".into() });
        }
        match stream.read(&mut buf) {
            Ok(0) => break head.len(),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(source) => return Err(TraceError::Io { addr, source }),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    head.advance(end);
    let status = text.split_whitespace().nth(1).unwrap_or("").to_string();
    if status != "200" {
        // The rest is the agent's one-line reason.
        let mut body = head.to_vec();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.read_to_end(&mut body);
        let message = String::from_utf8_lossy(&body).trim().to_string();
        return Err(if status.is_empty() || !text.starts_with("HTTP/1.1") {
            TraceError::NotTrace { addr, what: text.lines().next().unwrap_or("").to_string() }
        } else {
            TraceError::Refused { addr, pod: args.pod.clone(), message: if message.is_empty() { text } else { message } }
        });
    }
    if !text.to_ascii_lowercase().contains(&CONTENT_TYPE.to_ascii_lowercase()) {
        return Err(TraceError::NotTrace { addr, what: format!("no {CONTENT_TYPE} content (an older agent?)") });
    }
    dec.feed(&head);
    loop {
        match dec.next_frame() {
            Ok(Some(Frame::Started { pod, lease_secs, rate })) => {
                eprintln!("tracing {pod} (lease {lease_secs}s, at most {rate} records/s); Ctrl-C to stop");
                return Ok(Instant::now());
            }
            Ok(Some(Frame::End { reason, .. })) => {
                return Err(TraceError::Refused { addr, pod: args.pod.clone(), message: reason });
            }
            Ok(Some(_)) => {}
            Ok(None) => {}
            Err(source) => return Err(TraceError::Frame { addr, source }),
        }
        if Instant::now() > deadline {
            return Err(TraceError::NotTrace { addr, what: "the trace did not start within 10s".into() });
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(TraceError::NotTrace { addr, what: "the agent closed the stream before the trace started".into() }),
            Ok(n) => dec.feed(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(source) => return Err(TraceError::Io { addr, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").unwrap_err().to_string().contains("more than zero"));
        assert!(parse_duration("5 parsecs").unwrap_err().to_string().contains("--for \"5 parsecs\""));
        assert!(parse_duration("soon").is_err());
    }
}
