//! One rotator per config file: an advisory lock on a file next to it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The held rotation lock. Dropping it (or the process dying) releases it.
#[derive(Debug)]
pub struct RotationLock {
    _file: File,
    path: PathBuf,
}

impl RotationLock {
    /// Take the lock at `path` if no one holds it: `Ok(None)` when another process (or another
    /// rotator in this one) does. The file is created when missing and never removed, so the
    /// lock is always on the same inode.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(err)) => return Err(err),
        }
        // The holder's pid, for people wondering who rotates; not used for locking.
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        Ok(Some(Self {
            _file: file,
            path: path.to_owned(),
        }))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg.lock");
        let first = RotationLock::try_acquire(&path)
            .unwrap()
            .expect("free lock");
        assert!(RotationLock::try_acquire(&path).unwrap().is_none());
        drop(first);
        assert!(RotationLock::try_acquire(&path).unwrap().is_some());
    }
}
