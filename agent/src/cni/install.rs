//! Installing the chained plugin on a node, and removing it again: `sidecap install-cni` and
//! `sidecap uninstall --cni-conf-dir DIR --cni-bin-dir DIR`.
//!
//! - The binary `sidecap-cni` is copied next to the other plugins (temp file + rename, so a
//!   runtime never executes a half-written file).
//! - `{"type": "sidecap-cni", "socketPath": …}` is appended to the node's *primary* network
//!   configuration: the lexically first valid `*.conf` / `*.conflist` / `*.json` in the conf
//!   dir, which is the one kubelet's runtime (containerd, CRI-O through libcni) uses. A
//!   single-plugin `.conf` is turned into a `.conflist` holding it, as istio-cni does.
//! - Edits are textual: our entry is inserted after the last plugin and removed again by
//!   deleting exactly that span, so the rest of the file keeps its bytes (formatting, key
//!   order, numbers) and removal gives back the file as it was. A converted `.conf` keeps
//!   its original bytes inside the conflist and is written back on removal.
//! - Every write is a temp file in the same directory, fsynced, renamed over the target.
//!   Installing twice changes nothing the second time.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::protocol::POD_NAMESPACE_KEY;

/// Our entry's `type`, and the binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "sidecap-cni";
/// Key in our entry naming the `.conf` a conflist was made from (restored on removal).
const CONVERTED_FROM: &str = "sidecapConvertedFrom";
/// Extensions libcni / containerd read in the conf dir.
const EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Temp files start with this (and end in `.tmp`, which no runtime reads).
const TEMP_PREFIX: &str = ".sidecap-";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no valid CNI network configuration (*.conf, *.conflist, *.json) in {}: is the node's network plugin installed?", dir.display())]
    NoPrimary { dir: PathBuf },
    #[error("{}: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error("plugin binary {} not found (it ships next to `sidecap`; pass --plugin)", path.display())]
    NoPlugin { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.into(), source }
}

/// What `install` needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the runtime looks for plugin binaries (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// Where the runtime reads network configurations (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's CNI socket, written into our entry as `socketPath`.
    pub socket: PathBuf,
    /// The `sidecap-cni` binary to copy.
    pub plugin: PathBuf,
    /// `podNamespace` of our entry: the namespace of pods whose runtime sends no
    /// `K8S_POD_NAMESPACE` (podman). None on Kubernetes nodes, whose runtimes always send it.
    pub pod_namespace: Option<String>,
}

/// What happened to the primary configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    /// Our entry was already the last plugin with this socket: nothing written.
    Unchanged,
    /// Our entry was appended.
    Appended,
    /// Our entry was there but not last or with another socket: moved/updated.
    Updated,
    /// A single-plugin `.conf` became this conflist, with our entry.
    Converted { from: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    /// False when the installed binary already had these bytes.
    pub binary_written: bool,
    /// The primary configuration, as it is now.
    pub conf: PathBuf,
    pub change: ConfChange,
    /// Other configurations that held an entry of ours (it was removed from them).
    pub cleaned: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Configurations our entry was removed from.
    pub confs: Vec<PathBuf>,
    /// `.conf` files restored from a conflist we had made (the conflist is gone).
    pub restored: Vec<PathBuf>,
    /// The plugin binary, when it was there.
    pub binary: Option<PathBuf>,
}

/// Installs (or re-checks) the plugin binary and our entry in the primary configuration.
pub fn install(opts: &Options) -> Result<Installed, Error> {
    clean_temp_files(&opts.conf_dir);
    clean_temp_files(&opts.bin_dir);
    // Nothing is touched on a node without a network configuration yet; the binary goes in
    // before any configuration names it.
    let primary = primary_config(&opts.conf_dir)?.ok_or_else(|| Error::NoPrimary { dir: opts.conf_dir.clone() })?;
    let (binary, binary_written) = install_binary(&opts.plugin, &opts.bin_dir)?;
    // An entry of ours anywhere else (the primary changed, e.g. a new network plugin) goes.
    let mut cleaned = Vec::new();
    for path in config_files(&opts.conf_dir)? {
        if path != primary && remove_entry_from(&path)?.is_some() {
            cleaned.push(path);
        }
    }
    let socket = opts.socket.to_string_lossy();
    let ns = opts.pod_namespace.as_deref();
    let text = read_text(&primary)?;
    let is_list = has_plugins_array(&primary, &text)?;
    let (conf, change) = if is_list {
        let spans = plugins_spans(&text).map_err(|m| json_err(&primary, m))?;
        let ours = our_elements(&text, &spans);
        let last_is_ours_with_socket = ours.len() == 1
            && ours[0] == spans.elems.len() - 1
            && element_value(&text, spans.elems[ours[0]])["socketPath"].as_str() == Some(&*socket)
            && element_value(&text, spans.elems[ours[0]])[POD_NAMESPACE_KEY].as_str() == ns;
        if last_is_ours_with_socket {
            (primary, ConfChange::Unchanged)
        } else {
            let converted_from =
                ours.first().and_then(|&i| element_value(&text, spans.elems[i])[CONVERTED_FROM].as_str().map(String::from));
            let t = match converted_from {
                // A conflist we made: made again around the same original bytes.
                Some(from) if spans.elems.len() == 2 && ours == [1] => {
                    let original = original_before(&text, &spans, 1);
                    let v: Value = serde_json::from_str(&original).map_err(|e| json_err(&primary, e.to_string()))?;
                    converted_list(&v, &original, &socket, ns, &from)
                }
                converted_from => {
                    let mut t = text.clone();
                    for &i in ours.iter().rev() {
                        t = remove_element(&t, i).map_err(|m| json_err(&primary, m))?;
                    }
                    append_element(&t, &entry(&socket, ns, converted_from.as_deref())).map_err(|m| json_err(&primary, m))?
                }
            };
            write_atomic(&primary, t.as_bytes(), mode_of(&primary))?;
            let change = if ours.is_empty() { ConfChange::Appended } else { ConfChange::Updated };
            (primary, change)
        }
    } else {
        // A single plugin: a conflist of it and us, next to it; then the .conf goes.
        let from_name = file_name(&primary);
        let v: Value = serde_json::from_str(&text).map_err(|e| json_err(&primary, e.to_string()))?;
        let list = converted_list(&v, &text, &socket, ns, &from_name);
        let target = primary.with_extension("conflist");
        write_atomic(&target, list.as_bytes(), mode_of(&primary))?;
        fs::remove_file(&primary).map_err(io(&primary))?;
        sync_dir(&opts.conf_dir);
        (target, ConfChange::Converted { from: primary })
    };
    Ok(Installed { binary, binary_written, conf, change, cleaned })
}

/// Removes our entry from every configuration in `conf_dir` (restoring a `.conf` we had
/// turned into a conflist) and our binary from `bin_dir`. Missing dirs are fine.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Removed, Error> {
    let mut out = Removed::default();
    if conf_dir.exists() {
        clean_temp_files(conf_dir);
        for path in config_files(conf_dir)? {
            match remove_entry_from(&path)? {
                Some(Some(restored)) => out.restored.push(restored),
                Some(None) => out.confs.push(path),
                None => {}
            }
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => out.binary = Some(bin),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io { path: bin, source: e }),
    }
    if bin_dir.exists() {
        clean_temp_files(bin_dir);
    }
    Ok(out)
}

/// The configuration the runtime uses: the lexically first file with a CNI extension that
/// is valid (a conflist with plugins, or a single plugin with a `type`), as libcni decides.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    for path in config_files(conf_dir)? {
        let Ok(text) = fs::read_to_string(&path) else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
        let valid = if is_conflist_name(&path) {
            v["plugins"].as_array().is_some_and(|p| !p.is_empty())
        } else {
            v["type"].as_str().is_some_and(|t| !t.is_empty())
        };
        if valid {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Files with a CNI extension, sorted by name (libcni's order).
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e)))
        .collect();
    out.sort();
    Ok(out)
}

fn is_conflist_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "conflist")
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn json_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Json { path: path.into(), message: message.into() }
}

fn read_text(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(io(path))
}

fn has_plugins_array(path: &Path, text: &str) -> Result<bool, Error> {
    let v: Value = serde_json::from_str(text).map_err(|e| json_err(path, e.to_string()))?;
    Ok(v["plugins"].is_array())
}

/// Our entry, one line.
fn entry(socket: &str, pod_namespace: Option<&str>, converted_from: Option<&str>) -> String {
    let mut s = format!("{{\"type\": \"{PLUGIN_TYPE}\", \"socketPath\": {}", Value::from(socket));
    if let Some(ns) = pod_namespace {
        s.push_str(&format!(", \"{POD_NAMESPACE_KEY}\": {}", Value::from(ns)));
    }
    if let Some(f) = converted_from {
        s.push_str(&format!(", \"{CONVERTED_FROM}\": {}", Value::from(f)));
    }
    s.push('}');
    s
}

/// A conflist of a single-plugin configuration (its bytes verbatim, right after '[', up to
/// the comma) and our entry.
fn converted_list(conf: &Value, original: &str, socket: &str, pod_namespace: Option<&str>, from: &str) -> String {
    format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [{original},\n    {}\n  ]\n}}\n",
        conf.get("cniVersion").cloned().unwrap_or_else(|| "0.3.1".into()),
        conf.get("name").cloned().unwrap_or_else(|| "k8s-pod-network".into()),
        entry(socket, pod_namespace, Some(from)),
    )
}

/// Removes our entries from one file. None: there was none. Some(None): removed in place.
/// Some(Some(conf)): the file was a conflist we had made from `conf`, which is back.
fn remove_entry_from(path: &Path) -> Result<Option<Option<PathBuf>>, Error> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(None) };
    if serde_json::from_str::<Value>(&text).map(|v| !v["plugins"].is_array()).unwrap_or(true) {
        return Ok(None);
    }
    let spans = plugins_spans(&text).map_err(|m| json_err(path, m))?;
    let ours = our_elements(&text, &spans);
    if ours.is_empty() {
        return Ok(None);
    }
    // A conflist we made from a .conf, still holding just that plugin and us: put it back.
    let from = element_value(&text, spans.elems[ours[0]])[CONVERTED_FROM].as_str().map(String::from);
    if let (Some(from), true) = (from, spans.elems.len() == 2 && ours == [1]) {
        let conf = path.with_file_name(&from);
        let valid_name = Path::new(&from).file_name().is_some_and(|n| n == from.as_str()) && !is_conflist_name(&conf);
        if valid_name && !conf.exists() {
            // The original bytes sit between '[' and the comma before our entry.
            let original = original_before(&text, &spans, 1);
            write_atomic(&conf, original.as_bytes(), mode_of(path))?;
            fs::remove_file(path).map_err(io(path))?;
            sync_dir(path.parent().unwrap_or(Path::new(".")));
            return Ok(Some(Some(conf)));
        }
        if valid_name {
            // The network plugin wrote its .conf again meanwhile: ours is a stale copy.
            fs::remove_file(path).map_err(io(path))?;
            return Ok(Some(None));
        }
    }
    let mut t = text;
    for &i in ours.iter().rev() {
        t = remove_element(&t, i).map_err(|m| json_err(path, m))?;
    }
    write_atomic(path, t.as_bytes(), mode_of(path))?;
    Ok(Some(None))
}

fn element_value(text: &str, (start, end): (usize, usize)) -> Value {
    serde_json::from_str(&text[start..end]).unwrap_or(Value::Null)
}

/// Indices of plugin entries with our type.
fn our_elements(text: &str, spans: &Spans) -> Vec<usize> {
    (0..spans.elems.len()).filter(|&i| element_value(text, spans.elems[i])["type"] == PLUGIN_TYPE).collect()
}

/// Text between the array's '[' and the comma that precedes element `i`.
fn original_before(text: &str, spans: &Spans, i: usize) -> String {
    let b = text.as_bytes();
    let mut j = spans.elems[i].0;
    while j > spans.open && b[j - 1] != b',' {
        j -= 1;
    }
    text[spans.open + 1..j.saturating_sub(1).max(spans.open + 1)].to_string()
}

/// Inserts `elem` after the last plugin, separated as the existing ones are.
fn append_element(text: &str, elem: &str) -> Result<String, String> {
    let s = plugins_spans(text)?;
    let Some(&(_, last_end)) = s.elems.last() else {
        let mut t = text.to_string();
        t.insert_str(s.open + 1, elem);
        return Ok(t);
    };
    // The whitespace before an existing element (after '[' or after its comma).
    let sep = {
        let first = s.elems[if s.elems.len() >= 2 { 1 } else { 0 }].0;
        let b = text.as_bytes();
        let mut j = first;
        while j > 0 && b[j - 1].is_ascii_whitespace() {
            j -= 1;
        }
        let ws = &text[j..first];
        if ws.is_empty() { " " } else { ws }
    };
    let mut t = String::with_capacity(text.len() + elem.len() + sep.len() + 1);
    t.push_str(&text[..last_end]);
    t.push(',');
    t.push_str(sep);
    t.push_str(elem);
    t.push_str(&text[last_end..]);
    Ok(t)
}

/// Removes plugin element `i` and the separator that joined it to the list.
fn remove_element(text: &str, i: usize) -> Result<String, String> {
    let s = plugins_spans(text)?;
    let (start, end) = s.elems[i];
    let (cut_from, cut_to) = if i > 0 {
        // From the comma before it: whitespace after the previous element stays its own.
        let b = text.as_bytes();
        let mut j = start;
        while j > s.elems[i - 1].1 && b[j - 1] != b',' {
            j -= 1;
        }
        (j.saturating_sub(1).max(s.elems[i - 1].1), end)
    } else if s.elems.len() > 1 {
        (start, s.elems[1].0)
    } else {
        (start, end)
    };
    Ok(format!("{}{}", &text[..cut_from], &text[cut_to..]))
}

/// Byte spans of the top-level `plugins` array: its brackets and each element.
#[derive(Debug, PartialEq, Eq)]
struct Spans {
    open: usize,
    close: usize,
    elems: Vec<(usize, usize)>,
}

/// Finds the top-level `"plugins": [...]` and its elements' spans. The text must be valid
/// JSON (callers check with serde_json first); this only walks it.
fn plugins_spans(text: &str) -> Result<Spans, String> {
    let mut s = Scan { b: text.as_bytes(), i: 0 };
    s.ws();
    s.expect(b'{')?;
    loop {
        s.ws();
        if s.peek() == Some(b'}') {
            return Err("no top-level \"plugins\" array".into());
        }
        let (ks, ke) = s.string()?;
        let key: String = serde_json::from_str(&text[ks..ke]).map_err(|e| e.to_string())?;
        s.ws();
        s.expect(b':')?;
        s.ws();
        if key == "plugins" && s.peek() == Some(b'[') {
            let open = s.i;
            s.i += 1;
            let mut elems = Vec::new();
            loop {
                s.ws();
                if s.peek() == Some(b']') {
                    return Ok(Spans { open, close: s.i, elems });
                }
                let start = s.i;
                s.value(0)?;
                elems.push((start, s.i));
                s.ws();
                match s.next() {
                    Some(b',') => {}
                    Some(b']') => return Ok(Spans { open, close: s.i - 1, elems }),
                    _ => return Err(format!("unexpected input at byte {}", s.i)),
                }
            }
        }
        s.value(0)?;
        s.ws();
        match s.next() {
            Some(b',') => {}
            Some(b'}') => return Err("no top-level \"plugins\" array".into()),
            _ => return Err(format!("unexpected input at byte {}", s.i)),
        }
    }
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.next() == Some(c) { Ok(()) } else { Err(format!("expected '{}' at byte {}", c as char, self.i - 1)) }
    }

    /// A string's span, quotes included.
    fn string(&mut self) -> Result<(usize, usize), String> {
        let start = self.i;
        self.expect(b'"')?;
        loop {
            match self.next() {
                Some(b'\\') => self.i += 1,
                Some(b'"') => return Ok((start, self.i)),
                Some(_) => {}
                None => return Err("unterminated string".into()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), String> {
        if depth > 128 {
            return Err("nested too deeply".into());
        }
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(open @ (b'{' | b'[')) => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if open == b'{' {
                        self.string()?;
                        self.ws();
                        self.expect(b':')?;
                        self.ws();
                    }
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next() {
                        Some(b',') => {}
                        Some(c) if c == close => return Ok(()),
                        _ => return Err(format!("unexpected input at byte {}", self.i)),
                    }
                }
            }
            Some(_) => {
                let start = self.i;
                while self.peek().is_some_and(|c| !matches!(c, b',' | b']' | b'}') && !c.is_ascii_whitespace()) {
                    self.i += 1;
                }
                if self.i == start { Err(format!("unexpected input at byte {}", self.i)) } else { Ok(()) }
            }
            None => Err("unexpected end".into()),
        }
    }
}

/// Copies the plugin into `bin_dir` unless the same bytes are already there.
fn install_binary(plugin: &Path, bin_dir: &Path) -> Result<(PathBuf, bool), Error> {
    let bytes = fs::read(plugin).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoPlugin { path: plugin.into() },
        _ => Error::Io { path: plugin.into(), source: e },
    })?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|have| have == bytes) {
        return Ok((target, false));
    }
    write_atomic(&target, &bytes, 0o755)?;
    Ok((target, true))
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644)
}

/// Temp file in the same directory, fsync, rename over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!("{TEMP_PREFIX}{}.{}.tmp", file_name(path), std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Temp files a killed run left behind.
fn clean_temp_files(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(".tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests;
