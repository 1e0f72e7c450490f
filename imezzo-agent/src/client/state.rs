//! `client.state`: the replica's volume and the last seq applied *and* durable.

use super::*;

/// `client.state`: a few text lines, replaced atomically.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durable state; a new client's (nothing) when the file does not exist.
    pub fn load(&self) -> Result<ClientState, ClientError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ClientState::default()),
            Err(error) => {
                return Err(ClientError::State {
                    action: "read",
                    path: self.path.clone(),
                    error,
                })
            }
        };
        let corrupt = |reason: String| ClientError::StateCorrupt {
            path: self.path.clone(),
            reason,
        };
        let (mut volume, mut last) = (None, None);
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| corrupt(format!("line {line:?}")))?;
            let value = value.trim();
            match key {
                "volume" => {
                    volume = Some(if value == "none" {
                        None
                    } else {
                        let mut id = [0u8; 16];
                        hex::decode_to_slice(value, &mut id)
                            .map_err(|_| corrupt(format!("volume {value:?}")))?;
                        Some(id)
                    })
                }
                "last_applied" => {
                    last = Some(if value == "none" {
                        None
                    } else {
                        Some(
                            value
                                .parse::<u64>()
                                .map_err(|_| corrupt(format!("last_applied {value:?}")))?,
                        )
                    })
                }
                other => return Err(corrupt(format!("unknown key {other:?}"))),
            }
        }
        match (volume, last) {
            (Some(volume_id), Some(last_applied)) => Ok(ClientState {
                volume_id,
                last_applied,
            }),
            _ => Err(corrupt("a key is missing".into())),
        }
    }

    /// Replaces the state durably: after this returns, a crash leaves the new state.
    pub fn store(&self, state: &ClientState) -> Result<(), ClientError> {
        let err = |action, error| ClientError::State {
            action,
            path: self.path.clone(),
            error,
        };
        let text = format!(
            "# imezzo client state: the replica's volume and the last journal seq applied and durable\nvolume {}\nlast_applied {}\n",
            state.volume_id.map_or_else(|| "none".to_string(), hex::encode),
            state.last_applied.map_or_else(|| "none".to_string(), |s| s.to_string()),
        );
        let tmp = self.path.with_extension("state.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| err("write", e))?;
        f.write_all(text.as_bytes()).map_err(|e| err("write", e))?;
        f.sync_all().map_err(|e| err("fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| err("replace", e))?;
        // The rename is durable only once the directory is.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("fsync the directory of", e))
    }
}
