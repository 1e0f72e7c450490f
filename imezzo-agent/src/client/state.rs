//! `client.state`: the replica's volume and the last seq applied *and* durable.

use super::*;
use std::os::unix::fs::FileExt;

/// `client.state`: a few text lines padded to one sector ([`STATE_BYTES`]), overwritten in
/// place at every durable point: one write within one sector and one `fdatasync`. Storage
/// writes a sector whole or not at all (PostgreSQL's `pg_control` relies on the same, and
/// keeps to 512 bytes for it), and the `check` line tells a torn or garbled one anyway. The
/// first store, or one over a file of another size (an older agent's), replaces the file by
/// a temporary and a rename: a new inode, two fsyncs and the directory's, which at every
/// point were a tenth of the client's CPU under a steady stream of small changes.
const STATE_BYTES: usize = 512;
/// `client.state`: see [`STATE_BYTES`].
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
        let text = match std::fs::read(&self.path) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
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
        let lines = || {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
        };
        // Checked first: a torn write may garble any line.
        let check = lines().find_map(|l| l.strip_prefix("check ")).map(str::trim);
        let summed: String = lines()
            .filter(|l| !l.starts_with("check "))
            .flat_map(|l| [l, "\n"])
            .collect();
        if check.is_some_and(|c| c != format!("{:016x}", crate::checksum::fnv1a(summed.as_bytes()))) {
            // A write torn by a power loss (or a file edited by hand): nothing in it can be
            // trusted, so the client starts over as a new one would, with a full sync.
            log::warn!(
                "{}: its check line does not match (a torn write?): ignored; the client makes a full sync",
                self.path.display()
            );
            return Ok(ClientState::default());
        }
        let (mut volume, mut last) = (None, None);
        for line in lines() {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| corrupt(format!("line {line:?}")))?;
            let value = value.trim();
            match key {
                "check" => {}
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
        let lines = format!(
            "volume {}\nlast_applied {}\n",
            state.volume_id.map_or_else(|| "none".to_string(), hex::encode),
            state.last_applied.map_or_else(|| "none".to_string(), |s| s.to_string()),
        );
        let mut text = format!(
            "# imezzo client state: the replica's volume and the last journal seq applied and durable\n{lines}check {:016x}\n",
            crate::checksum::fnv1a(lines.as_bytes())
        )
        .into_bytes();
        // Padded with blank lines to one sector.
        text.resize(STATE_BYTES, b'\n');
        match std::fs::OpenOptions::new().write(true).open(&self.path) {
            Ok(f) if f.metadata().is_ok_and(|m| m.len() == STATE_BYTES as u64) => {
                f.write_all_at(&text, 0).map_err(|e| err("write", e))?;
                return f.sync_data().map_err(|e| err("fsync", e));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("open", e)),
        }
        let tmp = self.path.with_extension("state.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| err("write", e))?;
        f.write_all(&text).map_err(|e| err("write", e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_state_is_overwritten_in_place_in_one_sector_and_a_torn_one_means_a_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        // An older agent's file (no check line, another size) is read, then replaced.
        std::fs::write(file.path(), "volume none\nlast_applied none\n").unwrap();
        assert_eq!(file.load().unwrap().last_applied, None);
        let state = |seq| ClientState { volume_id: Some([7; 16]), last_applied: Some(seq) };
        file.store(&state(1)).unwrap();
        let ino = std::fs::metadata(file.path()).unwrap().ino();
        assert_eq!(std::fs::metadata(file.path()).unwrap().len(), STATE_BYTES as u64);
        // Later stores overwrite the same inode.
        file.store(&state(42)).unwrap();
        let back = file.load().unwrap();
        assert_eq!((back.volume_id, back.last_applied), (Some([7; 16]), Some(42)));
        assert_eq!(std::fs::metadata(file.path()).unwrap().ino(), ino, "rewritten, not replaced");
        // A torn write: the new seq's digits over the old record's check.
        let mut bytes = std::fs::read(file.path()).unwrap();
        let at = bytes.windows(15).position(|w| w == b"last_applied 42").unwrap();
        bytes[at + 13..at + 15].copy_from_slice(b"43");
        std::fs::write(file.path(), &bytes).unwrap();
        let torn = file.load().unwrap();
        assert_eq!((torn.volume_id, torn.last_applied), (None, None), "a torn record is a new client's");
        // A file that is no state record at all (no check line) is the operator's to see.
        std::fs::write(file.path(), [0xffu8; STATE_BYTES]).unwrap();
        assert!(matches!(file.load(), Err(ClientError::StateCorrupt { .. })));
    }
}
