//! Content fingerprints of objects: a hash of their `Debug` form, fed to the hasher as it is
//! formatted (no string is built). Computed once per object read, not per pass.

use std::{
    fmt::{self, Write as _},
    hash::{DefaultHasher, Hasher},
};

struct HashWriter(DefaultHasher);

impl fmt::Write for HashWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

/// The fingerprint of `t`'s content: equal for equal `Debug` output.
pub fn of<T: fmt::Debug + ?Sized>(t: &T) -> u64 {
    let mut w = HashWriter(DefaultHasher::new());
    let _ = write!(w, "{t:?}");
    w.0.finish()
}
