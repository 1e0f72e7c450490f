//! The one checksum of the agent's small state records (`captured-through` on the server,
//! `client.state` on the client): FNV-1a, enough to tell a whole record from a torn or
//! foreign one. Not a defence against anyone who writes the file on purpose.

/// FNV-1a of `bytes`.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}
