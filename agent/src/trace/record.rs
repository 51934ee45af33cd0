//! One kernel trace record: aya-log text `HOOK HEX` (`ebpf/sidecap-ebpf/src/trace.rs`),
//! the hex being the bytes of a `sidecap_common::trace` record struct; decoded here with
//! `bytes` (hex into a buffer, fields read off it in the struct's order) and rendered with
//! the names of `sidecap_common::trace`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use serde_json::{Map, Value};
use sidecap_common::trace::{ConnectRecord, DnsRecord, GetsockoptRecord, SkLookupRecord, names};

/// A decoded record; `fields` in the order they are shown.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `connect4`, `connect6`, `getsockopt`, `sk_lookup`, `sendmsg4`, `sendmsg6`.
    pub hook: String,
    pub netns: u64,
    pub fields: Vec<(String, Value)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("trace record {text:?}: not HOOK HEX")]
    Shape { text: String },
    #[error("trace record {text:?}: unknown hook {hook:?}")]
    Hook { text: String, hook: String },
    #[error("trace record {text:?}: {why}")]
    Bytes { text: String, why: &'static str },
    #[error("trace record of {hook}: field {field} has unknown code {code}")]
    Code { hook: String, field: &'static str, code: u8 },
}

/// Hex into bytes.
fn unhex(hex: &str) -> Option<Bytes> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let mut out = BytesMut::with_capacity(hex.len() / 2);
    for pair in hex.as_bytes().chunks(2) {
        let s = std::str::from_utf8(pair).ok()?;
        out.extend_from_slice(&[u8::from_str_radix(s, 16).ok()?]);
    }
    Some(out.freeze())
}

/// A 16-byte address (IPv4 v4-mapped) as the address of its own family.
fn addr(b: &mut Bytes) -> IpAddr {
    let mut a = [0u8; 16];
    b.copy_to_slice(&mut a);
    let ip = Ipv6Addr::from(a);
    ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip))
}

fn sock(ip: IpAddr, port: u16) -> Value {
    Value::from(SocketAddr::new(ip, port).to_string())
}

impl Record {
    pub fn parse(text: &str) -> Result<Record, RecordError> {
        let (hook, hex) = text.trim().split_once(' ').ok_or_else(|| RecordError::Shape { text: text.into() })?;
        let size = match hook {
            "connect4" | "connect6" => size_of::<ConnectRecord>(),
            "getsockopt" => size_of::<GetsockoptRecord>(),
            "sk_lookup" => size_of::<SkLookupRecord>(),
            "sendmsg4" | "sendmsg6" => size_of::<DnsRecord>(),
            _ => return Err(RecordError::Hook { text: text.into(), hook: hook.into() }),
        };
        let mut b = unhex(hex).ok_or_else(|| RecordError::Bytes { text: text.into(), why: "not hex" })?;
        if b.len() != size {
            return Err(RecordError::Bytes { text: text.into(), why: "not the record's size" });
        }
        let code = |field: &'static str, code: u8, f: fn(u8) -> Option<&'static str>| {
            f(code).map(Value::from).ok_or(RecordError::Code { hook: hook.into(), field, code })
        };
        // Native byte order: the kernel wrote the struct on this machine.
        let netns = b.get_u64_ne();
        let mut fields: Vec<(&str, Value)> = Vec::new();
        match hook {
            "connect4" | "connect6" => {
                let (src, dst, to) = (addr(&mut b), addr(&mut b), addr(&mut b));
                let (uid, gid, listener) = (b.get_u32_ne(), b.get_u32_ne(), b.get_u32_ne());
                let (src_port, dst_port, to_port) = (b.get_u16_ne(), b.get_u16_ne(), b.get_u16_ne());
                let (_family, proto, verdict, step, rule) = (b.get_u8(), b.get_u8(), b.get_u8(), b.get_u8(), b.get_u8());
                fields.push(("proto", Value::from(if proto == sidecap_common::proto::UDP { "udp" } else { "tcp" })));
                fields.push(("src", sock(src, src_port)));
                fields.push(("dst", sock(dst, dst_port)));
                fields.push(("uid", uid.into()));
                fields.push(("gid", gid.into()));
                fields.push(("verdict", code("verdict", verdict, names::verdict)?));
                fields.push(("step", step.into()));
                fields.push(("rule", code("rule", rule, names::rule)?));
                if listener != 0 {
                    fields.push(("listener", listener.into()));
                }
                if to_port != 0 {
                    fields.push(("to", sock(to, to_port)));
                }
            }
            "getsockopt" => {
                let (local, remote, orig) = (addr(&mut b), addr(&mut b), addr(&mut b));
                let (local_port, remote_port, orig_port) = (b.get_u16_ne(), b.get_u16_ne(), b.get_u16_ne());
                let result = b.get_u8();
                fields.push(("local", sock(local, local_port)));
                fields.push(("remote", sock(remote, remote_port)));
                fields.push(("result", code("result", result, names::lookup)?));
                if orig_port != 0 {
                    fields.push(("orig", sock(orig, orig_port)));
                }
            }
            "sk_lookup" => {
                let (remote, local) = (addr(&mut b), addr(&mut b));
                let (remote_port, port, rule, result) = (b.get_u16_ne(), b.get_u16_ne(), b.get_u8(), b.get_u8());
                fields.push(("remote", sock(remote, remote_port)));
                fields.push(("local", sock(local, port)));
                fields.push(("port", port.into()));
                fields.push(("rule", code("rule", rule, names::inbound_rule)?));
                fields.push(("result", code("result", result, names::assign)?));
            }
            _ => {
                let (src, dst) = (addr(&mut b), addr(&mut b));
                let (uid, gid) = (b.get_u32_ne(), b.get_u32_ne());
                let (src_port, dst_port, to_port) = (b.get_u16_ne(), b.get_u16_ne(), b.get_u16_ne());
                fields.push(("proto", "udp".into()));
                fields.push(("src", sock(src, src_port)));
                fields.push(("dst", sock(dst, dst_port)));
                fields.push(("uid", uid.into()));
                fields.push(("gid", gid.into()));
                fields.push(("verdict", "dns".into()));
                fields.push(("step", 3.into()));
                let lo = if hook == "sendmsg6" && !dst.is_ipv4() { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::from([127, 0, 0, 1]) };
                fields.push(("to", sock(lo, to_port)));
            }
        }
        Ok(Record { hook: hook.into(), netns, fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect() })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `{"pod", "hook", "netns", <fields>...}`: one line of `sidecap trace --output json`.
    pub fn to_json(&self, pod: &str, unix_ms: u64) -> Value {
        let mut m = Map::new();
        m.insert("time_ms".into(), Value::from(unix_ms));
        m.insert("pod".into(), Value::from(pod));
        m.insert("hook".into(), Value::from(self.hook.clone()));
        m.insert("netns".into(), Value::from(self.netns));
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// Fields shown before the rest of a text line.
const HEAD: &[&str] = &["time_ms", "pod", "hook", "netns"];
/// The order fields are shown in a text line.
const TEXT_ORDER: &[&str] = &[
    "proto",
    "src",
    "dst",
    "local",
    "remote",
    "port",
    "uid",
    "gid",
    "verdict",
    "step",
    "rule",
    "listener",
    "listener_name",
    "result",
    "orig",
    "to",
];

/// One line of `sidecap trace --output text` for a record in its JSON form.
pub fn render_text(v: &Value) -> String {
    let Some(m) = v.as_object() else { return v.to_string() };
    let time = m.get("time_ms").and_then(Value::as_u64).map(clock).unwrap_or_default();
    let mut out =
        format!("{time} {} {}", m.get("pod").and_then(Value::as_str).unwrap_or("?"), m.get("hook").and_then(Value::as_str).unwrap_or("?"));
    // The kernel's order for the known fields (JSON objects here are sorted), then the rest.
    let known = TEXT_ORDER.iter().filter_map(|k| m.get(*k).map(|v| (*k, v)));
    let rest = m
        .iter()
        .filter(|(k, _)| !TEXT_ORDER.contains(&k.as_str()) && !HEAD.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v));
    for (k, v) in known.chain(rest) {
        match v {
            Value::String(s) if s.contains(' ') => out.push_str(&format!(" {k}={s:?}")),
            Value::String(s) => out.push_str(&format!(" {k}={s}")),
            other => out.push_str(&format!(" {k}={other}")),
        }
    }
    out
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecap_common::{addr::v4_mapped, trace::*};

    fn hex<T>(r: &T) -> String {
        // SAFETY: the record structs are repr(C) plain data with explicit padding.
        let b = unsafe { std::slice::from_raw_parts(r as *const T as *const u8, size_of::<T>()) };
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_connect_record_decodes_with_names_and_plain_addresses() {
        let r = ConnectRecord {
            netns: 4099,
            dst: v4_mapped([10, 251, 100, 10]),
            to: v4_mapped([127, 0, 0, 1]),
            src: v4_mapped([0, 0, 0, 0]),
            uid: 1000,
            gid: 1000,
            listener: 77,
            dst_port: 8080,
            to_port: 15001,
            family: 4,
            proto: 6,
            verdict: verdict::CAPTURE,
            step: 6,
            rule: rule::LISTENER,
            ..Default::default()
        };
        let rec = Record::parse(&format!("connect4 {}", hex(&r))).expect("parse");
        assert_eq!((rec.hook.as_str(), rec.netns), ("connect4", 4099));
        let j = rec.to_json("default/a", 0);
        assert_eq!(j["dst"], "10.251.100.10:8080");
        assert_eq!(j["to"], "127.0.0.1:15001");
        assert_eq!((&j["verdict"], &j["step"], &j["rule"]), (&"capture".into(), &6.into(), &"outbound listener".into()));
        let line = render_text(&j);
        assert!(line.starts_with("00:00:00.000 default/a connect4 proto=tcp src=0.0.0.0:0 dst=10.251.100.10:8080 uid=1000"), "{line}");
        assert!(line.contains(" rule=\"outbound listener\" listener=77 to=127.0.0.1:15001"), "{line}");
    }

    #[test]
    fn v6_drops_and_sk_lookup() {
        let mut dst = [0u8; 16];
        dst[..2].copy_from_slice(&[0xfd, 0x00]);
        dst[15] = 1;
        let r = ConnectRecord {
            netns: 1,
            dst,
            dst_port: 80,
            family: 6,
            proto: 6,
            verdict: verdict::DROP,
            step: 7,
            rule: rule::NO_LISTENER,
            ..Default::default()
        };
        let rec = Record::parse(&format!("connect6 {}", hex(&r))).expect("parse");
        assert_eq!(rec.get("dst"), Some(&Value::from("[fd00::1]:80")));
        assert_eq!(rec.get("verdict"), Some(&Value::from("drop")));
        assert_eq!(rec.get("to"), None, "not rewritten");
        let s = SkLookupRecord {
            netns: 1,
            remote: v4_mapped([10, 251, 2, 2]),
            local: v4_mapped([10, 251, 1, 2]),
            remote_port: 40000,
            port: 8080,
            rule: inbound_rule::ALL_PORTS,
            result: assign::ASSIGNED,
            ..Default::default()
        };
        let rec = Record::parse(&format!("sk_lookup {}", hex(&s))).expect("parse");
        assert_eq!(rec.get("remote"), Some(&Value::from("10.251.2.2:40000")));
        assert_eq!(rec.get("result"), Some(&Value::from("assigned")));
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert!(matches!(Record::parse("connect4"), Err(RecordError::Shape { .. })));
        assert!(matches!(Record::parse("bind4 00"), Err(RecordError::Hook { .. })));
        assert!(matches!(Record::parse("connect4 0g"), Err(RecordError::Bytes { .. })));
        assert!(matches!(Record::parse("connect4 0000"), Err(RecordError::Bytes { .. })));
        let r = ConnectRecord { verdict: 99, ..Default::default() };
        let e = Record::parse(&format!("connect4 {}", hex(&r))).unwrap_err();
        assert_eq!(e.to_string(), "trace record of connect4: field verdict has unknown code 99");
    }
}
