//! SHA-256 digests as the crate writes them: lower-case hex (checkpoint checksums, victim
//! cache keys, export manifests).

/// `bytes` as lower-case hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
