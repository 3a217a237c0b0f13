//! Reading the small files a token lives in without hanging and without reading without bound.
//!
//! A config file replaced by a FIFO, a device or a huge file must not stall or bloat the
//! process that reads it. [`read`] opens with `O_NONBLOCK` (so opening a FIFO with no writer
//! returns at once), refuses anything but a regular file, and refuses files larger than
//! [`MAX_LEN`]. With [`Links::Refuse`] it also opens with `O_NOFOLLOW`, for files that only this
//! program writes and that a link in their place could redirect.
//!
//! ```
//! use fresh_token::small_file::{self, Links};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let path = dir.path().join("state.json");
//! std::fs::write(&path, "{}")?;
//! assert_eq!(small_file::read_to_string(&path, Links::Refuse)?, "{}");
//!
//! let err = small_file::read(dir.path(), Links::Follow).unwrap_err();
//! assert!(err.to_string().contains("not a regular file"));
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// The largest file [`read`] accepts: 1 MiB, far above any config or state file.
pub const MAX_LEN: u64 = 1024 * 1024;

/// Whether a symbolic link at the path is followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Follow it (a config file kept in a dotfiles repository is often a link).
    Follow,
    /// Refuse it with `ELOOP` (files this program alone writes).
    Refuse,
}

/// Open `path` for reading without blocking on a FIFO, following links or not, and check that it
/// is a regular file.
pub fn open_regular(path: &Path, links: Links) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut flags = libc::O_NONBLOCK;
        if links == Links::Refuse {
            flags |= libc::O_NOFOLLOW;
        }
        options.custom_flags(flags);
    }
    #[cfg(not(unix))]
    let _ = links;
    let file = options.open(path)?;
    check_regular(&file)?;
    Ok(file)
}

/// An error unless `file` is a regular file, naming what it is instead.
pub fn check_regular(file: &File) -> io::Result<()> {
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(());
    }
    let what = describe(&kind);
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file ({what})"),
    ))
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// The contents of the regular file at `path`, at most [`MAX_LEN`] bytes.
pub fn read(path: &Path, links: Links) -> io::Result<Vec<u8>> {
    let file = open_regular(path, links)?;
    let len = file.metadata()?.len();
    if len > MAX_LEN {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may grow between the check and the read: read one byte past the cap to know.
    file.take(MAX_LEN + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_LEN {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text (`InvalidData` if it is not).
pub fn read_to_string(path: &Path, links: Links) -> io::Result<String> {
    String::from_utf8(read(path, links)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {} KiB", MAX_LEN / 1024),
    )
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn reads_regular_files_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cfg");
        std::fs::write(&file, "[DEFAULT]\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_LEN as usize + 1]).unwrap();
        let cap = dir.path().join("cap");
        std::fs::write(&cap, vec![b'a'; MAX_LEN as usize]).unwrap();
        let bad_utf8 = dir.path().join("latin1");
        std::fs::write(&bad_utf8, b"[DEFAULT]\ntoken = caf\xe9\n").unwrap();

        assert_eq!(read(&file, Links::Follow).unwrap(), b"[DEFAULT]\n");
        assert_eq!(read(&link, Links::Follow).unwrap(), b"[DEFAULT]\n");
        assert_eq!(read(&cap, Links::Refuse).unwrap().len() as u64, MAX_LEN);
        let cases: &[(&Path, Links, &str)] = &[
            (&link, Links::Refuse, "symbolic links"),
            (&fifo, Links::Follow, "not a regular file (a FIFO)"),
            (
                dir.path(),
                Links::Follow,
                "not a regular file (a directory)",
            ),
            (Path::new("/dev/zero"), Links::Follow, "a device"),
            (&big, Links::Follow, "larger than 1024 KiB"),
        ];
        for (path, links, needle) in cases {
            let started = Instant::now();
            let err = read(path, *links).expect_err("refused");
            assert!(started.elapsed() < Duration::from_secs(5), "{path:?} hung");
            assert!(err.to_string().contains(needle), "{path:?}: {err}");
        }
        let err = read_to_string(&bad_utf8, Links::Follow).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
