//! The Unix socket listener (`PROXY_UNIX_SOCKET`): only its owner may connect.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Listen on a Unix socket at `path`, mode 0600. A socket left there by an earlier run that no
/// one answers on any more is replaced; one that answers, or a file that is not a socket, is
/// an error. Must be called within a tokio runtime.
pub fn listen_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    // Bound under a temporary name, narrowed to 0600, then renamed into place: the socket never
    // appears at `path` with the umask's wider mode.
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let staging = path.with_file_name(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(err) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(err);
    }
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let first = listen_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let err = listen_unix(&path).expect_err("the socket is in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        drop(first);
        let _second = listen_unix(&path).expect("a socket no one answers on is replaced");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        let err = listen_unix(&file).expect_err("a regular file is not replaced");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }
}
