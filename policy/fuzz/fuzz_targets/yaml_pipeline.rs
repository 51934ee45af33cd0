//! YAML → validate → evaluate → compile must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = sidecap_policy::fuzz_entry::run(&text);
});
