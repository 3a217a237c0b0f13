//! Reading a sink file and writing the token into it.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use fresh_token::Token;
use fresh_token::small_file::{self, Links};

use super::{Sink, SinkEdit, SinkKind, dotenv, json, yaml};

/// What writing a sink did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkOutcome {
    /// The value was changed in place.
    Written,
    /// The file was rewritten whole from its parsed value: the data is kept, comments are not.
    Rewritten,
    /// The file does not exist: skipped.
    Missing,
}

/// Why a sink could not be written. Never holds the token or the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not a document the token can be put in.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Sink {
    /// Put `token` in the file: atomically, keeping the file's mode (0600 should the file
    /// vanish before the write). A missing file is skipped. The file is read only if it is a
    /// regular file of at most 1 MiB, without blocking on a FIFO.
    pub fn write(&self, token: &Token) -> Result<SinkOutcome, SinkError> {
        let target = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::canonicalize(&self.path).map_err(|source| self.io(source))?
            }
            Ok(_) => self.path.clone(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(SinkOutcome::Missing),
            Err(err) => return Err(self.io(err)),
        };
        let text = match small_file::read_to_string(&target, Links::Follow) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(SinkOutcome::Missing),
            Err(err) => return Err(self.io(err)),
        };
        let value = token.expose_secret();
        let edit = match self.kind {
            SinkKind::Dotenv => SinkEdit::InPlace(dotenv::set_dotenv(&text, &self.key, value)),
            SinkKind::Json => {
                json::set_json(&text, &self.key, value).map_err(|r| self.format(r))?
            }
            SinkKind::Yaml => {
                let path: Vec<&str> = self.key.split('.').collect();
                yaml::set_yaml(&text, &path, value).map_err(|r| self.format(r))?
            }
        };
        let (updated, outcome) = match edit {
            SinkEdit::InPlace(text) => (text, SinkOutcome::Written),
            SinkEdit::Rewritten(text) => (text, SinkOutcome::Rewritten),
        };
        if updated != text {
            fresh_token::databrickscfg::write_atomic(&target, updated.as_bytes(), None)
                .map_err(|source| self.io(source))?;
        }
        Ok(outcome)
    }

    fn io(&self, source: io::Error) -> SinkError {
        SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn format(&self, reason: String) -> SinkError {
        SinkError::Format {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Whether permission bits let group or others read or write a file.
pub fn loose(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Warns about sink files that group or others may read or write, since they hold a live
/// token: once per file, again only after it was fixed and loosened anew.
#[derive(Debug, Default)]
pub struct SinkPermissions {
    warned: HashSet<PathBuf>,
}

impl SinkPermissions {
    /// Look at `sink`'s file (through a link) and warn if its mode is loose and has not been
    /// warned about. Returns the loose mode it warned about.
    pub fn check(&mut self, sink: &Sink) -> Option<u32> {
        let mode = file_mode(&sink.path)?;
        if !loose(mode) {
            self.warned.remove(&sink.path);
            return None;
        }
        if !self.warned.insert(sink.path.clone()) {
            return None;
        }
        tracing::warn!(
            sink = %sink,
            mode = %format!("{mode:04o}"),
            "a sink file that holds the token can be read or written by group or others: run chmod 600 on it"
        );
        Some(mode)
    }
}

#[cfg(unix)]
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::metadata(path).ok()?.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn write_keeps_mode_and_skips_missing_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "A=1\nTOKEN=old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let sink = Sink {
            kind: SinkKind::Dotenv,
            path: path.clone(),
            key: "TOKEN".to_owned(),
        };
        let token = Token::new("dapi-new").unwrap();
        assert_eq!(sink.write(&token).unwrap(), SinkOutcome::Written);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "A=1\nTOKEN=dapi-new\n"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let missing = Sink {
            path: dir.path().join("absent.env"),
            ..sink
        };
        assert_eq!(missing.write(&token).unwrap(), SinkOutcome::Missing);
        assert!(!missing.path.exists());
    }

    #[cfg(unix)]
    #[test]
    fn loose_modes_are_warned_about_once_until_fixed() {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let cases = [
            (0o600, false),
            (0o400, false),
            (0o640, true),
            (0o604, true),
            (0o666, true),
            (0o620, true),
        ];
        for (mode, expected) in cases {
            assert_eq!(loose(mode), expected, "{mode:o}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "TOKEN=old\n").unwrap();
        let sink = Sink {
            kind: SinkKind::Dotenv,
            path: path.clone(),
            key: "TOKEN".to_owned(),
        };
        let mut permissions = SinkPermissions::default();
        set_mode(&path, 0o644);
        assert_eq!(permissions.check(&sink), Some(0o644));
        assert_eq!(permissions.check(&sink), None, "warned once");
        set_mode(&path, 0o600);
        assert_eq!(permissions.check(&sink), None);
        set_mode(&path, 0o666);
        assert_eq!(permissions.check(&sink), Some(0o666), "loosened anew");
        let missing = Sink {
            path: dir.path().join("absent.env"),
            ..sink
        };
        assert_eq!(permissions.check(&missing), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_sink_that_vanishes_before_the_write_is_recreated_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.env");
        fresh_token::databrickscfg::write_atomic(&path, b"TOKEN=x\n", None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_a_sink_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo.env");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let sink = Sink {
            kind: SinkKind::Dotenv,
            path,
            key: "TOKEN".to_owned(),
        };
        let err = sink.write(&Token::new("dapi-new").unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
