//! A node's identity: a self-signed certificate and its private key, kept in the node's state
//! directory and named by its node id, the SHA-256 of the certificate.
//!
//! Operators exchange node ids, never certificates: a server lists the clients it serves with
//! `--allow NODE_ID`, a client names the server it trusts with `--server-id NODE_ID`, and
//! [`crate::transport`] pins both ends of every connection to those ids. There is no certificate
//! authority and no expiry to manage, as with SSH host keys.
//!
//! On disk (`DIR` is the `--state` directory, created 0700 when missing):
//! - `DIR/identity.key.der`: the private key, PKCS#8 DER, mode 0600;
//! - `DIR/identity.cert.der`: the certificate, X.509 DER, mode 0644.
//!
//! Invariant: an identity exists exactly when `identity.cert.der` exists. [`Identity::create`]
//! makes the key durable before it renames the certificate into place, so a crash leaves either
//! no certificate (nothing was printed or handed out, and `imezzo init` simply starts again) or
//! a complete identity.

use std::{
    fmt,
    fs::{self, File, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::{
        fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
    str::FromStr,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// File name of the certificate inside the state directory.
pub const CERT_FILE: &str = "identity.cert.der";
/// File name of the private key inside the state directory.
pub const KEY_FILE: &str = "identity.key.der";
/// The one subject alternative name every node's certificate carries. Peers are told apart by
/// node id, never by name, so every node has the same name.
pub const CERT_NAME: &str = "imezzo";

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const STATE_DIR_MODE: u32 = 0o700;

/// A node's id: the SHA-256 of its certificate's DER encoding. Shown and parsed as 64
/// lowercase hex digits, as `imezzo init` and `imezzo id` print it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// The id of the node whose certificate is `cert_der`.
    pub fn of_cert(cert_der: &[u8]) -> NodeId {
        NodeId(Sha256::digest(cert_der).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> NodeId {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error(
        "node id {input:?} has a non-hex character {ch:?} at position {position}; a node id is \
         the 64 hex digits that `imezzo id --state DIR` prints on that node"
    )]
    NotHex { input: String, ch: char, position: usize },
    #[error(
        "node id {input:?} has {len} hex digits, not 64; a node id is the 64 hex digits that \
         `imezzo id --state DIR` prints on that node (was it cut short when copied?)"
    )]
    Length { input: String, len: usize },
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    /// Accepts upper or lower case and surrounding whitespace (a pasted line keeps its newline).
    fn from_str(s: &str) -> Result<NodeId, NodeIdError> {
        let digits = s.trim();
        // Echo at most a line's worth of what was given: the input may be a whole pasted file.
        let shown = || digits.chars().take(80).collect::<String>();
        if let Some((position, ch)) = digits.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(NodeIdError::NotHex { input: shown(), ch, position });
        }
        let mut bytes = [0u8; 32];
        match hex::decode_to_slice(digits, &mut bytes) {
            Ok(()) => Ok(NodeId(bytes)),
            // Every character is a hex digit, so only the length can be wrong.
            Err(_) => Err(NodeIdError::Length { input: shown(), len: digits.len() }),
        }
    }
}

/// Why an identity cannot be created or loaded. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{dir} is already initialised, node id {id} (`imezzo id --state {dir}` prints it); to \
         give this node a new id instead, remove {dir}/{CERT_FILE} and {dir}/{KEY_FILE} first, \
         then every server must --allow the new id", dir = .dir.display()
    )]
    AlreadyInitialised { dir: PathBuf, id: NodeId },
    #[error(
        "no node identity in {dir} ({why}): run `imezzo init --state {dir}` to create one",
        dir = .dir.display()
    )]
    NotInitialised { dir: PathBuf, why: &'static str },
    #[error(
        "{dir}/{KEY_FILE} is missing but the certificate of node {id} is there: restore the key \
         from a backup, or remove {dir}/{CERT_FILE} and run `imezzo init --state {dir}` to make \
         a new node id (which every server must then --allow)", dir = .dir.display()
    )]
    KeyMissing { dir: PathBuf, id: NodeId },
    #[error(
        "the identity in {dir} (node id {id}) is unusable: {reason}; restore it from a backup, or \
         remove {dir}/{CERT_FILE} and {dir}/{KEY_FILE} and run `imezzo init --state {dir}` to \
         make a new node id", dir = .dir.display()
    )]
    Corrupt { dir: PathBuf, id: NodeId, reason: String },
    #[error("--state {dir} exists but is not a directory: give a directory path", dir = .dir.display())]
    StateNotDirectory { dir: PathBuf },
    #[error(
        "another imezzo process is initialising {dir}: wait for it to finish, then run \
         `imezzo id --state {dir}`", dir = .dir.display()
    )]
    Busy { dir: PathBuf },
    // Causes are part of the message and not `source()`: the binary prints the whole chain.
    #[error("cannot {action} {path}: {error}", path = .path.display())]
    Io { action: &'static str, path: PathBuf, error: io::Error },
    #[error("cannot generate a certificate: {0}")]
    Generate(rcgen::Error),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |error| IdentityError::Io { action, path, error }
}

/// A node's certificate, private key and id. `id` is always `NodeId::of_cert(&cert_der)`.
#[derive(Clone)]
pub struct Identity {
    /// The self-signed certificate, X.509 DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub id: NodeId,
}

impl fmt::Debug for Identity {
    // The key stays out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity in memory only: an ECDSA P-256 key and a self-signed certificate for
    /// [`CERT_NAME`]. [`Identity::create`] is the one that persists it.
    pub fn generate() -> Result<Identity, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Generate)?;
        let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).map_err(IdentityError::Generate)?;
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, "imezzo node");
        params.distinguished_name = name;
        let cert = params.self_signed(&key).map_err(IdentityError::Generate)?;
        let cert_der = cert.der().to_vec();
        Ok(Identity { id: NodeId::of_cert(&cert_der), cert_der, key_der: key.serialize_der() })
    }

    /// Creates the node's identity in `state_dir` (made 0700 if missing) and returns it.
    /// Refuses with [`IdentityError::AlreadyInitialised`] when the directory already holds one:
    /// a node's id is what servers allow, so it is never replaced behind the operator's back.
    pub fn create(state_dir: &Path) -> Result<Identity, IdentityError> {
        ensure_state_dir(state_dir)?;
        // Cheap refusal first, so a running node's state dir is never locked by a stray init.
        refuse_existing(state_dir)?;
        let _lock = DirLock::try_exclusive(state_dir)?;
        // Another init may have finished between the first check and taking the lock.
        refuse_existing(state_dir)?;

        let identity = Identity::generate()?;
        // Key first, certificate last: the certificate's rename is the commit point (module docs).
        write_atomically(state_dir, KEY_FILE, &identity.key_der, KEY_MODE)?;
        write_atomically(state_dir, CERT_FILE, &identity.cert_der, CERT_MODE)?;
        Ok(identity)
    }

    /// Loads the identity `imezzo init --state DIR` created, checking that the key is the
    /// certificate's.
    pub fn load(state_dir: &Path) -> Result<Identity, IdentityError> {
        let dir = state_dir.to_path_buf();
        let cert_path = state_dir.join(CERT_FILE);
        let cert_der = match fs::read(&cert_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let why = if state_dir.is_dir() {
                    "the directory has no identity files"
                } else {
                    "the directory does not exist"
                };
                return Err(IdentityError::NotInitialised { dir, why });
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(IdentityError::StateNotDirectory { dir });
            }
            Err(e) => return Err(io_error("read", &cert_path)(e)),
        };
        let id = NodeId::of_cert(&cert_der);

        let key_path = state_dir.join(KEY_FILE);
        let key_der = match fs::read(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::KeyMissing { dir, id });
            }
            Err(e) => return Err(io_error("read", &key_path)(e)),
        };
        if let Ok(meta) = fs::metadata(&key_path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                log::warn!(
                    "{} is readable by other users (mode {mode:o}): anyone who reads it can pose \
                     as node {id}; run `chmod 600 {}`",
                    key_path.display(),
                    key_path.display()
                );
            }
        }

        let identity = Identity { cert_der, key_der, id };
        identity.certified_key(&crate::transport::crypto_provider()).map_err(|e| IdentityError::Corrupt {
            dir,
            id,
            reason: e.to_string(),
        })?;
        Ok(identity)
    }

    /// The certificate and the loaded signing key, as rustls uses them; fails when the key does
    /// not parse or is not the certificate's.
    pub(crate) fn certified_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<rustls::sign::CertifiedKey, rustls::Error> {
        let certified = rustls::sign::CertifiedKey::from_der(
            vec![CertificateDer::from(self.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            provider,
        )?;
        // from_der tolerates a key whose public half it cannot compute; ours always can, so a
        // mismatch is never let through.
        certified.keys_match()?;
        Ok(certified)
    }
}

fn refuse_existing(state_dir: &Path) -> Result<(), IdentityError> {
    let cert_path = state_dir.join(CERT_FILE);
    match fs::read(&cert_path) {
        Ok(cert) => Err(IdentityError::AlreadyInitialised { dir: state_dir.to_path_buf(), id: NodeId::of_cert(&cert) }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("read", &cert_path)(e)),
    }
}

/// Makes `dir` a directory, 0700 when created here. An existing directory keeps its mode: it
/// may be shared with other tools, and the key file is 0600 in any case.
fn ensure_state_dir(dir: &Path) -> Result<(), IdentityError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(IdentityError::StateNotDirectory { dir: dir.to_path_buf() }),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(IdentityError::StateNotDirectory { dir: dir.to_path_buf() })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(dir)
                .map_err(io_error("create directory", dir))?;
            // The umask may have taken bits away; set exactly what the docs promise.
            fs::set_permissions(dir, Permissions::from_mode(STATE_DIR_MODE))
                .map_err(io_error("set permissions of", dir))?;
            sync_dir(parent_of(dir))
        }
        Err(e) => Err(io_error("inspect", dir)(e)),
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old file or the whole new
/// one: write a temporary file, fsync it, rename it over `name`, fsync the directory so the
/// rename itself is durable before the caller goes on.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    // The caller holds the directory lock, so a leftover temporary file is from a crashed init
    // and is ours to truncate. O_NOFOLLOW: never write the key through a planted symlink.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    // A leftover file keeps its old mode through O_TRUNC, and the umask trims new ones.
    file.set_permissions(Permissions::from_mode(mode)).map_err(io_error("set permissions of", &tmp))?;
    file.write_all(bytes).map_err(io_error("write", &tmp))?;
    file.sync_all().map_err(io_error("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_error("rename into place", &path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("fsync directory", dir))
}

/// An exclusive flock on the state directory, held while an identity is written, so two
/// concurrent `imezzo init` cannot pair one's key with the other's certificate.
struct DirLock {
    // Never read: the lock is the open descriptor, released when it closes.
    _dir: File,
}

impl DirLock {
    fn try_exclusive(dir: &Path) -> Result<DirLock, IdentityError> {
        let file = File::open(dir).map_err(io_error("open directory", dir))?;
        // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(DirLock { _dir: file });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Err(IdentityError::Busy { dir: dir.to_path_buf() })
        } else {
            Err(io_error("lock directory", dir)(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_its_hex_form() {
        let id = NodeId::of_cert(b"certificate");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert_eq!(format!(" {}\n", text.to_uppercase()).parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn node_id_parse_names_the_bad_character() {
        let mut text = NodeId::of_cert(b"x").to_string();
        text.replace_range(10..11, "g");
        let err = text.parse::<NodeId>().unwrap_err();
        assert!(matches!(err, NodeIdError::NotHex { ch: 'g', position: 10, .. }), "{err:?}");
        assert!(err.to_string().contains("imezzo id"), "{err}");
    }

    #[test]
    fn node_id_parse_names_a_short_id() {
        let text = &NodeId::of_cert(b"x").to_string()[..63];
        let err = text.parse::<NodeId>().unwrap_err();
        assert!(matches!(err, NodeIdError::Length { len: 63, .. }), "{err:?}");
        assert!(err.to_string().contains("not 64"), "{err}");
        assert!(matches!("".parse::<NodeId>(), Err(NodeIdError::Length { len: 0, .. })));
    }

    #[test]
    fn generated_identity_is_consistent() {
        let identity = Identity::generate().unwrap();
        assert_eq!(identity.id, NodeId::of_cert(&identity.cert_der));
        identity.certified_key(&crate::transport::crypto_provider()).unwrap();
        assert!(!format!("{identity:?}").contains("key_der"));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let mixed = Identity { key_der: b.key_der, ..a };
        assert!(mixed.certified_key(&crate::transport::crypto_provider()).is_err());
    }
}
