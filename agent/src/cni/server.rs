//! The agent's end of the CNI socket: one thread accepting, each request handed to the
//! reconciliation loop, the reply written back when the loop answers (bounded).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::mpsc::{Sender, channel},
    time::Duration,
};

use super::{Reply, Request};

/// A request and where to send its reply.
pub type Pending = (Request, Sender<Reply>);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// Longest a plugin call may wait for the loop.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn serve(path: &Path, to_loop: Sender<Pending>) -> Result<(), Error> {
    let err = |source| Error::Bind { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket file left by a previous agent.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::thread::Builder::new()
        .name("cni".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = to_loop.clone();
                // One thread per plugin call: calls for different pods don't queue.
                let _ = std::thread::Builder::new().name("cni-call".into()).spawn(move || handle(stream, tx));
            }
        })
        .map_err(err)?;
    Ok(())
}

fn handle(stream: UnixStream, to_loop: Sender<Pending>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let reply = match BufReader::new(&stream).read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (tx, rx) = channel();
                let pod = req.pod();
                if to_loop.send((req, tx)).is_err() {
                    Reply { ok: false, message: "sidecap agent is shutting down".into() }
                } else {
                    rx.recv_timeout(REPLY_TIMEOUT).unwrap_or(Reply {
                        ok: false,
                        message: format!("sidecap agent did not set up {pod} within {}s", REPLY_TIMEOUT.as_secs()),
                    })
                }
            }
            Err(e) => Reply { ok: false, message: format!("bad request from sidecap-cni: {e}") },
        },
        Err(e) => Reply { ok: false, message: format!("reading the request: {e}") },
    };
    let mut w = &stream;
    let _ = writeln!(w, "{}", serde_json::to_string(&reply).unwrap_or_default());
}
