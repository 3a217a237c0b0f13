//! Reading and updating a Databricks config file (`~/.databrickscfg`).
//!
//! The file is an INI file shared with the Databricks CLI and SDKs, so this module reads it the
//! way they do (no quote or escape processing) and changes it surgically: an update rewrites only
//! the lines of the keys it sets, in the one profile it names, and keeps every other profile,
//! key, comment and blank line as it was. Writes are atomic: a temporary file in the same
//! directory, `fsync`, `rename`, then `fsync` of the directory, so a reader sees the old file or
//! the new one, never half of one.
//!
//! ```
//! use fresh_token::databrickscfg;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let path = dir.path().join(".databrickscfg");
//! std::fs::write(&path, "[DEFAULT]\nhost = https://example.cloud.databricks.com\ntoken = dapi-old\n\n[other]\ntoken = dapi-other\n")?;
//!
//! databrickscfg::update_profile(&path, "DEFAULT", &[("token", "dapi-new")])?;
//!
//! let profile = databrickscfg::read_profile(&path, "DEFAULT")?;
//! assert_eq!(profile.token.unwrap().expose_secret(), "dapi-new");
//! assert_eq!(profile.host.as_deref(), Some("https://example.cloud.databricks.com"));
//! let other = databrickscfg::read_profile(&path, "other")?;
//! assert_eq!(other.token.unwrap().expose_secret(), "dapi-other");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ini::{Ini, ParseOption};

use crate::small_file::{self, Links};
use crate::token::{InvalidToken, Token};

/// The keys of one profile that this crate and the proxy use.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Workspace URL.
    pub host: Option<String>,
    /// Personal access token.
    pub token: Option<Token>,
    /// OAuth client id of a service principal.
    pub client_id: Option<String>,
    /// OAuth client secret of a service principal.
    pub client_secret: Option<Token>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("host", &self.host)
            .field("token", &self.token)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish()
    }
}

/// Why a profile could not be read. Messages name the file and the profile, never a value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is not valid INI.
    #[error("{path} is not a valid config file: {reason}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the parser said (line and column, no values).
        reason: String,
    },
    /// The file has no section of that name.
    #[error("{path} has no profile [{profile}]")]
    MissingProfile {
        /// The config file.
        path: PathBuf,
        /// The profile asked for.
        profile: String,
    },
    /// A secret in the profile cannot be used in a header.
    #[error("{path} profile [{profile}] key `{key}`: {source}")]
    InvalidSecret {
        /// The config file.
        path: PathBuf,
        /// The profile.
        profile: String,
        /// The key holding the bad value.
        key: &'static str,
        /// What is wrong with it.
        source: InvalidToken,
    },
}

/// Read `profile` from the file at `path`: a regular file (a link to one is followed) of at
/// most [`small_file::MAX_LEN`] bytes, opened without blocking on a FIFO.
pub fn read_profile(path: &Path, profile: &str) -> Result<Profile, ConfigFileError> {
    let text =
        small_file::read_to_string(path, Links::Follow).map_err(|source| ConfigFileError::Io {
            path: path.to_owned(),
            source,
        })?;
    parse_profile(&text, profile).map_err(|err| err.at(path))
}

/// Parse `profile` out of the text of a config file. Errors carry an empty path; use
/// [`read_profile`] to have the file named.
pub fn parse_profile(text: &str, profile: &str) -> Result<Profile, ConfigFileError> {
    let options = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: true,
        ..ParseOption::default()
    };
    let ini = Ini::load_from_str_opt(text, options).map_err(|err| ConfigFileError::Parse {
        path: PathBuf::new(),
        reason: format!("line {}, column {}", err.line, err.col),
    })?;
    let section = section(&ini, profile).ok_or_else(|| ConfigFileError::MissingProfile {
        path: PathBuf::new(),
        profile: profile.to_owned(),
    })?;
    let text_value = |key: &str| {
        section
            .iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let secret_value = |key: &'static str| {
        text_value(key)
            .map(Token::new)
            .transpose()
            .map_err(|source| ConfigFileError::InvalidSecret {
                path: PathBuf::new(),
                profile: profile.to_owned(),
                key,
                source,
            })
    };
    Ok(Profile {
        host: text_value("host").map(str::to_owned),
        token: secret_value("token")?,
        client_id: text_value("client_id").map(str::to_owned),
        client_secret: secret_value("client_secret")?,
    })
}

fn section<'a>(ini: &'a Ini, profile: &str) -> Option<&'a ini::Properties> {
    ini.iter()
        .find(|(name, _)| name.map(str::trim) == Some(profile))
        .map(|(_, props)| props)
}

impl ConfigFileError {
    fn at(self, file: &Path) -> Self {
        let file = file.to_owned();
        match self {
            Self::Io { source, .. } => Self::Io { path: file, source },
            Self::Parse { reason, .. } => Self::Parse { path: file, reason },
            Self::MissingProfile { profile, .. } => Self::MissingProfile {
                path: file,
                profile,
            },
            Self::InvalidSecret {
                profile,
                key,
                source,
                ..
            } => Self::InvalidSecret {
                path: file,
                profile,
                key,
                source,
            },
        }
    }
}

/// Set `updates` (key, value pairs) in `profile` of the file at `path`, creating the file or the
/// profile when missing, and write it back atomically with mode 0600.
///
/// Every other profile, key, comment and blank line is kept. If `path` is a symbolic link, the
/// file it points to is updated and the link stays.
pub fn update_profile(path: &Path, profile: &str, updates: &[(&str, &str)]) -> io::Result<()> {
    let target = resolve_link(path)?;
    let current = match small_file::read_to_string(&target, Links::Follow) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err),
    };
    let updated = apply_updates(&current, profile, updates);
    write_atomic(&target, updated.as_bytes(), Some(0o600))
}

/// The text of a config file with `updates` applied to `profile`: pure, for
/// [`update_profile`] and for tests.
pub fn apply_updates(text: &str, profile: &str, updates: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    if let Some(last) = lines.last_mut().filter(|line| !line.ends_with('\n')) {
        last.push('\n');
    }
    let mut done = vec![false; updates.len()];
    let mut in_profile = false;
    let mut insert_at = None;
    let mut replacing_continuation = false;
    let mut index = 0;
    while index < lines.len() {
        let line = &lines[index];
        let trimmed = line.trim();
        if trimmed.starts_with('[') && trimmed.ends_with(']') {
            in_profile = trimmed[1..trimmed.len() - 1].trim() == profile;
            replacing_continuation = false;
            if in_profile && insert_at.is_none() {
                insert_at = Some(index + 1);
            }
            index += 1;
            continue;
        }
        if !in_profile {
            index += 1;
            continue;
        }
        let is_continuation = line.starts_with([' ', '\t']) && !trimmed.is_empty();
        if replacing_continuation && is_continuation {
            // The rest of a multi-line value we just replaced.
            lines.remove(index);
            continue;
        }
        replacing_continuation = false;
        if trimmed.is_empty() || trimmed.starts_with(['#', ';']) {
            index += 1;
            continue;
        }
        if let Some(split) = line.find(['=', ':']) {
            let key = line[..split].trim();
            if let Some(pos) = updates
                .iter()
                .position(|(k, _)| k.eq_ignore_ascii_case(key))
            {
                let indent = &line[..line.len() - line.trim_start().len()];
                lines[index] = format!("{indent}{key} = {}\n", updates[pos].1);
                done[pos] = true;
                replacing_continuation = true;
            }
        }
        insert_at = Some(index + 1);
        index += 1;
    }
    let missing: Vec<String> = updates
        .iter()
        .zip(&done)
        .filter(|(_, done)| !**done)
        .map(|((key, value), _)| format!("{key} = {value}\n"))
        .collect();
    match insert_at {
        Some(at) => {
            lines.splice(at..at, missing);
        }
        None => {
            if lines.last().is_some_and(|line| !line.trim().is_empty()) {
                lines.push("\n".to_owned());
            }
            lines.push(format!("[{profile}]\n"));
            lines.extend(missing);
        }
    }
    lines.concat()
}

/// Replace the file at `path` with `contents` atomically: a temporary file in the same
/// directory, `fsync`, `rename`, `fsync` of the directory.
///
/// `mode` sets the permission bits of the new file; `None` keeps those of the file being
/// replaced (0600 for a new file).
pub fn write_atomic(path: &Path, contents: &[u8], mode: Option<u32>) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file = tempfile::Builder::new()
        .prefix(".fresh-token-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    file.write_all(contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = match mode {
            Some(mode) => mode,
            None => match fs::metadata(path) {
                Ok(meta) => meta.permissions().mode() & 0o7777,
                Err(_) => 0o600,
            },
        };
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|err| err.error)?;
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn resolve_link(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path),
        _ => Ok(path.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
; written by hand
[DEFAULT]
host = https://example.cloud.databricks.com
token = dapi-old

[staging]
host = https://staging.cloud.databricks.com
token = dapi-staging
# keep me
cluster_id = 0123
";

    #[test]
    fn apply_updates_table() {
        struct Case {
            name: &'static str,
            text: &'static str,
            profile: &'static str,
            updates: &'static [(&'static str, &'static str)],
            expected: &'static str,
        }
        let cases = [
            Case {
                name: "replace token, keep everything else",
                text: SAMPLE,
                profile: "DEFAULT",
                updates: &[("token", "dapi-new")],
                expected: SAMPLE_WITH_NEW_DEFAULT_TOKEN,
            },
            Case {
                name: "insert missing key after the last key of the profile",
                text: "[a]\nhost = h\n\n[b]\ntoken = t\n",
                profile: "a",
                updates: &[("token", "x")],
                expected: "[a]\nhost = h\ntoken = x\n\n[b]\ntoken = t\n",
            },
            Case {
                name: "append missing profile",
                text: "[a]\ntoken = t",
                profile: "b",
                updates: &[("host", "h"), ("token", "x")],
                expected: "[a]\ntoken = t\n\n[b]\nhost = h\ntoken = x\n",
            },
            Case {
                name: "empty file",
                text: "",
                profile: "DEFAULT",
                updates: &[("token", "x")],
                expected: "[DEFAULT]\ntoken = x\n",
            },
            Case {
                name: "colon separator and multi-line value are replaced whole",
                text: "[a]\ntoken: old\n  continued\nhost = h\n",
                profile: "a",
                updates: &[("token", "x")],
                expected: "[a]\ntoken = x\nhost = h\n",
            },
            Case {
                name: "a key of the same name in another profile is untouched",
                text: "[b]\ntoken = keep\n[a]\ntoken = old\n",
                profile: "a",
                updates: &[("token", "x")],
                expected: "[b]\ntoken = keep\n[a]\ntoken = x\n",
            },
        ];
        for case in cases {
            assert_eq!(
                apply_updates(case.text, case.profile, case.updates),
                case.expected,
                "{}",
                case.name
            );
        }
    }

    const SAMPLE_WITH_NEW_DEFAULT_TOKEN: &str = "\
; written by hand
[DEFAULT]
host = https://example.cloud.databricks.com
token = dapi-new

[staging]
host = https://staging.cloud.databricks.com
token = dapi-staging
# keep me
cluster_id = 0123
";

    #[test]
    fn parse_profile_reads_keys_and_names_problems() {
        let profile = parse_profile(SAMPLE, "staging").unwrap();
        assert_eq!(
            profile.host.as_deref(),
            Some("https://staging.cloud.databricks.com")
        );
        assert_eq!(profile.token.unwrap().expose_secret(), "dapi-staging");

        let missing = parse_profile(SAMPLE, "prod").unwrap_err();
        assert!(
            matches!(missing, ConfigFileError::MissingProfile { .. }),
            "{missing}"
        );

        let no_token = parse_profile("[a]\nhost = h\ntoken =\n", "a").unwrap();
        assert!(no_token.token.is_none());

        let bad = parse_profile("[a]\ntoken = dapi secret\n", "a").unwrap_err();
        assert!(matches!(
            bad,
            ConfigFileError::InvalidSecret { key: "token", .. }
        ));
        assert!(!bad.to_string().contains("secret\n"));
        assert!(!bad.to_string().contains("dapi"));

        let broken = parse_profile("[a\ntoken = x\n", "a").unwrap_err();
        assert!(matches!(broken, ConfigFileError::Parse { .. }), "{broken}");
    }

    #[cfg(unix)]
    #[test]
    fn update_profile_keeps_other_profiles_and_leaves_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        fs::write(&path, SAMPLE).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

        update_profile(&path, "DEFAULT", &[("token", "dapi-new")]).unwrap();

        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            SAMPLE_WITH_NEW_DEFAULT_TOKEN
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let staging = read_profile(&path, "staging").unwrap();
        assert_eq!(staging.token.unwrap().expose_secret(), "dapi-staging");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != ".databrickscfg")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[cfg(unix)]
    #[test]
    fn update_profile_through_a_symlink_updates_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.cfg");
        let link = dir.path().join(".databrickscfg");
        fs::write(&real, "[DEFAULT]\ntoken = a\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();

        update_profile(&link, "DEFAULT", &[("token", "b")]).unwrap();

        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&real).unwrap(), "[DEFAULT]\ntoken = b\n");
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_keeps_mode_when_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        fs::write(&path, "A=1\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"A=2\n", None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=2\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}
