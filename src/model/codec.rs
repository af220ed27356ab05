//! Little-endian byte codec for model snapshots: compact, versioned by the caller.

use super::DecodeError;

/// Appends fixed-width little-endian values.
#[derive(Default)]
pub struct Writer {
    /// Bytes written.
    pub buf: Vec<u8>,
}

#[allow(missing_docs)]
impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
}

/// Reads what [`Writer`] wrote; running out of bytes is an error, never a panic.
pub struct Reader<'a> {
    buf: &'a [u8],
}

macro_rules! get {
    ($name:ident, $t:ty, $n:expr) => {
        #[allow(missing_docs)]
        pub fn $name(&mut self) -> Result<$t, DecodeError> {
            if self.buf.len() < $n {
                return Err(DecodeError::Truncated);
            }
            let (head, rest) = self.buf.split_at($n);
            self.buf = rest;
            let mut a = [0u8; $n];
            a.copy_from_slice(head);
            Ok(<$t>::from_le_bytes(a))
        }
    };
}

impl<'a> Reader<'a> {
    /// Read from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    get!(u8, u8, 1);
    get!(u16, u16, 2);
    get!(u32, u32, 4);
    get!(u64, u64, 8);
    get!(i64, i64, 8);
    get!(f32, f32, 4);
    get!(f64, f64, 8);

    /// Length-prefixed bytes, as [`Writer::bytes`] wrote them.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A count of items that each take at least `min_bytes`: larger than what is left
    /// means corrupt input, refused before anything is allocated for it.
    pub fn count(&mut self, min_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_bytes.max(1)) > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}
