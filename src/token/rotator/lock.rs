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
    ///
    /// Any other failure is an error the caller must report: a lock that cannot be opened
    /// (permissions, a read-only directory) would otherwise turn this process into a follower
    /// that never rotates. A link at `path` is refused (`ELOOP`) rather than followed, and so
    /// is anything but a regular file, because the holder truncates the file to write its pid.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .mode(0o600);
        }
        let mut file = options.open(path)?;
        fresh_token::small_file::check_regular(&file)?;
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
    fn lock_cases() {
        one_holder_at_a_time();
        #[cfg(unix)]
        a_link_or_a_fifo_in_its_place_is_an_error_and_the_target_is_untouched();
    }

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

    /// Runs after [`one_holder_at_a_time`] in the same test: a child process forked while that
    /// test holds the lock would share its open file until it execs, and keep it held.
    #[cfg(unix)]
    fn a_link_or_a_fifo_in_its_place_is_an_error_and_the_target_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.path().join("cfg.lock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = RotationLock::try_acquire(&path).expect_err("a link is refused");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

        // A dangling link is not created through either.
        let dangling = dir.path().join("dangling.lock");
        std::os::unix::fs::symlink(dir.path().join("created"), &dangling).unwrap();
        assert!(RotationLock::try_acquire(&dangling).is_err());
        assert!(!dir.path().join("created").exists());

        let fifo = dir.path().join("fifo.lock");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let err = RotationLock::try_acquire(&fifo).expect_err("a FIFO is refused");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
