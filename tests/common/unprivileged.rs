//! Running the real binary as an unprivileged user, where root would bypass the permission
//! checks a test is about (a read-only directory, a file of mode 000).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `nobody` on Debian and most distributions.
const NOBODY: u32 = 65534;

/// How to run the binary without privileges, and whose files it may touch.
#[derive(Debug)]
pub struct Unprivileged {
    /// A copy of the binary that the user can execute wherever the build tree lives.
    exe: PathBuf,
    /// `setpriv`, when this process is root and must drop to [`NOBODY`].
    setpriv: Option<PathBuf>,
    /// The user the binary runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

impl Unprivileged {
    /// Set up in `dir` (made reachable for the user). `None`, with the reason printed, when this
    /// process is root and `setpriv` is not installed: then the test cannot be run as it must.
    pub fn new(dir: &Path) -> Option<Self> {
        let probe = dir.join(".whoami");
        std::fs::write(&probe, "").unwrap();
        let me = std::fs::metadata(&probe).unwrap();
        std::fs::remove_file(&probe).unwrap();
        let (setpriv, uid, gid) = if me.uid() == 0 {
            let Some(setpriv) = find_tool("setpriv") else {
                println!("skipped: running as root and setpriv (util-linux) is not installed");
                return None;
            };
            (Some(setpriv), NOBODY, NOBODY)
        } else {
            (None, me.uid(), me.gid())
        };
        let exe = dir.join("fresh-proxy");
        std::fs::copy(env!("CARGO_BIN_EXE_fresh-proxy"), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Self {
            exe,
            setpriv,
            uid,
            gid,
        })
    }

    /// A command for the binary as the user, with a clean environment: only `HOME` and what the
    /// test sets.
    pub fn command(&self, home: &Path) -> Command {
        let mut cmd = match &self.setpriv {
            Some(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.arg(format!("--reuid={}", self.uid))
                    .arg(format!("--regid={}", self.gid))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(&self.exe);
                cmd
            }
            None => Command::new(&self.exe),
        };
        cmd.env_clear().env("HOME", home).stdin(Stdio::null());
        cmd
    }

    /// Make the user own `path`.
    pub fn give(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
}
