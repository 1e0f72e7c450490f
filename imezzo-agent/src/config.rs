//! Settings of `imezzo server` and `imezzo client`: the long flags, an optional TOML file
//! with the same keys (`--config FILE`), and their merge, where a flag wins over the file.
//!
//! The file's keys are those of both commands (`export`, `state`, `listen`, `allow`,
//! `retain_bytes`, `server`, `server_id`, `root`, `mode`), so one file may describe a node
//! that runs either; each command reads the keys it knows and ignores the other command's.
//! A key that is neither is an error: a typo must not silently fall back on a default.
//!
//! ```toml
//! export = "/srv/data"
//! state = "/var/lib/imezzo"
//! listen = "0.0.0.0:7070"
//! allow = ["3f0c…64 hex digits…", "…"]
//! retain_bytes = 1073741824
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::identity::{NodeId, NodeIdError};

/// Default bound of the server journal's retained entries: 1 GiB.
pub const DEFAULT_RETAIN_BYTES: u64 = 1 << 30;

/// The TOML file given with `--config`: every key optional, unknown keys refused.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub export: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub listen: Option<String>,
    pub allow: Option<Vec<String>>,
    pub retain_bytes: Option<u64>,
    pub server: Option<String>,
    pub server_id: Option<String>,
    pub root: Option<PathBuf>,
    pub mode: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}; check the path given to --config", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the config file {} is not valid: {message}; its keys are export, state, listen, allow, retain_bytes, \
         server, server_id, root and mode, as the long flags",
        path.display()
    )]
    Parse { path: PathBuf, message: String },
    #[error("no {what} given: pass --{flag}, or set `{key}` in the --config file")]
    Missing { what: &'static str, flag: &'static str, key: &'static str },
    #[error("--{flag} {value:?} is not an address: {reason}; give IP:PORT (such as 127.0.0.1:7070) or HOST:PORT")]
    BadAddress { flag: &'static str, value: String, reason: String },
    #[error("--{flag}: {source}")]
    BadNodeId { flag: &'static str, source: NodeIdError },
    #[error("--mode {0:?} is not supported: the one mode this imezzo runs is `replicate`")]
    BadMode(String),
    #[error("--retain-bytes 0 would keep no journal at all, so every reconnecting client would resync in full: give at least a few MiB")]
    ZeroRetention,
}

/// The server's flags as given on the command line (all optional, so the file may supply them).
#[derive(Debug, Default, Clone)]
pub struct ServerFlags {
    pub export: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub listen: Option<String>,
    pub allow: Vec<String>,
    pub retain_bytes: Option<u64>,
    pub config: Option<PathBuf>,
}

/// The client's flags as given on the command line.
#[derive(Debug, Default, Clone)]
pub struct ClientFlags {
    pub server: Option<String>,
    pub server_id: Option<String>,
    pub root: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub mode: Option<String>,
    pub config: Option<PathBuf>,
}

/// What `imezzo server` runs with, after the merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// The exported tree.
    pub export: PathBuf,
    /// The node's state dir: identity and `journal.redb`.
    pub state: PathBuf,
    pub listen: SocketAddr,
    /// Clients let in.
    pub allow: Vec<NodeId>,
    /// Bound of the journal's retained entries.
    pub retain_bytes: u64,
}

/// How a client keeps its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A full duplicate of the export, kept current by replaying the journal.
    Replicate,
}

/// What `imezzo client` runs with, after the merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub server: SocketAddr,
    /// The node id the server must present.
    pub server_id: NodeId,
    /// The replica.
    pub root: PathBuf,
    /// The node's state dir: identity, `client.state`, replay marks.
    pub state: PathBuf,
    pub mode: Mode,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        ConfigFile::parse(&text, path)
    }

    /// Parses a config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.message().to_string() })
    }
}

fn file_of(config: &Option<PathBuf>) -> Result<ConfigFile, ConfigError> {
    config.as_deref().map_or_else(|| Ok(ConfigFile::default()), ConfigFile::load)
}

fn required<T>(v: Option<T>, what: &'static str, flag: &'static str, key: &'static str) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Missing { what, flag, key })
}

/// Resolves `HOST:PORT` or `IP:PORT` to one socket address (the first the resolver gives).
pub fn parse_address(flag: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = value.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |reason: String| ConfigError::BadAddress { flag, value: value.to_string(), reason };
    let mut addrs = value.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    addrs.next().ok_or_else(|| bad("the name resolves to no address".into()))
}

fn parse_id(flag: &'static str, value: &str) -> Result<NodeId, ConfigError> {
    value.parse().map_err(|source| ConfigError::BadNodeId { flag, source })
}

impl ServerFlags {
    /// Merges the flags with the `--config` file (flags win; `--allow` given on the command
    /// line replaces the file's list rather than adding to it).
    pub fn resolve(self) -> Result<ServerOptions, ConfigError> {
        let file = file_of(&self.config)?;
        let export = required(self.export.or(file.export), "exported directory", "export", "export")?;
        let state = required(self.state.or(file.state), "state directory", "state", "state")?;
        let listen = required(self.listen.or(file.listen), "listen address", "listen", "listen")?;
        let listen = parse_address("listen", &listen)?;
        let allow = if self.allow.is_empty() { file.allow.unwrap_or_default() } else { self.allow };
        let allow = allow.iter().map(|a| parse_id("allow", a)).collect::<Result<Vec<_>, _>>()?;
        let retain_bytes = self.retain_bytes.or(file.retain_bytes).unwrap_or(DEFAULT_RETAIN_BYTES);
        if retain_bytes == 0 {
            return Err(ConfigError::ZeroRetention);
        }
        Ok(ServerOptions { export, state, listen, allow, retain_bytes })
    }
}

impl ClientFlags {
    /// Merges the flags with the `--config` file (flags win).
    pub fn resolve(self) -> Result<ClientOptions, ConfigError> {
        let file = file_of(&self.config)?;
        let server = required(self.server.or(file.server), "server address", "server", "server")?;
        let server = parse_address("server", &server)?;
        let server_id = required(self.server_id.or(file.server_id), "server node id", "server-id", "server_id")?;
        let server_id = parse_id("server-id", &server_id)?;
        let root = required(self.root.or(file.root), "replica root", "root", "root")?;
        let state = required(self.state.or(file.state), "state directory", "state", "state")?;
        let mode = match self.mode.or(file.mode) {
            None => Mode::Replicate,
            Some(m) if m == "replicate" => Mode::Replicate,
            Some(m) => return Err(ConfigError::BadMode(m)),
        };
        Ok(ClientOptions { server, server_id, root, state, mode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const ID_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imezzo.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_fills_the_rest() {
        let (_d, path) = write_config(&format!(
            "export = \"/srv/a\"\nstate = \"/var/lib/s\"\nlisten = \"127.0.0.1:7000\"\nallow = [\"{ID_A}\"]\nretain_bytes = 4096\n"
        ));
        let flags = ServerFlags {
            export: Some("/srv/b".into()),
            allow: vec![ID_B.into()],
            config: Some(path),
            ..Default::default()
        };
        let o = flags.resolve().unwrap();
        assert_eq!(o.export, PathBuf::from("/srv/b"));
        assert_eq!(o.state, PathBuf::from("/var/lib/s"));
        assert_eq!(o.listen, "127.0.0.1:7000".parse::<SocketAddr>().unwrap());
        assert_eq!(o.allow, vec![ID_B.parse().unwrap()]);
        assert_eq!(o.retain_bytes, 4096);
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_naming_it() {
        let (_d, path) = write_config("exprot = \"/srv/a\"\n");
        let err = ServerFlags { config: Some(path), ..Default::default() }.resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("exprot"), "{err}");
    }

    #[test]
    fn one_file_serves_both_commands() {
        let (_d, path) = write_config(&format!(
            "state = \"/s\"\nexport = \"/e\"\nlisten = \"[::1]:7070\"\nserver = \"127.0.0.1:7070\"\nserver_id = \"{ID_A}\"\nroot = \"/r\"\nmode = \"replicate\"\n"
        ));
        let s = ServerFlags { config: Some(path.clone()), ..Default::default() }.resolve().unwrap();
        assert_eq!(s.retain_bytes, DEFAULT_RETAIN_BYTES);
        assert!(s.allow.is_empty());
        let c = ClientFlags { config: Some(path), ..Default::default() }.resolve().unwrap();
        assert_eq!(c.root, PathBuf::from("/r"));
        assert_eq!(c.mode, Mode::Replicate);
        assert_eq!(c.server_id, ID_A.parse().unwrap());
    }

    #[test]
    fn a_missing_setting_names_both_the_flag_and_the_key() {
        let err = ClientFlags { server: Some("127.0.0.1:1".into()), ..Default::default() }.resolve().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--server-id") && text.contains("`server_id`"), "{text}");
    }

    #[test]
    fn bad_values_are_refused_with_what_to_give() {
        let flags = |mode: &str| ClientFlags {
            server: Some("127.0.0.1:1".into()),
            server_id: Some(ID_A.into()),
            root: Some("/r".into()),
            state: Some("/s".into()),
            mode: Some(mode.into()),
            config: None,
        };
        assert!(matches!(flags("mirror").resolve(), Err(ConfigError::BadMode(m)) if m == "mirror"));
        let mut f = flags("replicate");
        f.server_id = Some("abc".into());
        assert!(matches!(f.resolve(), Err(ConfigError::BadNodeId { .. })));
        let mut f = flags("replicate");
        f.server = Some("no-port".into());
        assert!(matches!(f.resolve(), Err(ConfigError::BadAddress { .. })));
    }
}
