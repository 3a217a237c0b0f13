//! Running the Databricks CLI: `databricks version` and `databricks auth token`, the way the
//! SDKs run it (Go: `config/cli_token_source.go`; Python: `DatabricksCliTokenSource` in
//! `databricks/sdk/credentials_provider.py`).
//!
//! The pure parts (the command line, the JSON answer, expiry formats, versions, which failures
//! need a person) are functions without I/O; [`run`] is the only one that starts a process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fresh_token::Token;
use serde::Deserialize;

use super::error::{ApiError, ErrorKind, truncate};

/// How long one CLI run may take before it is killed and counted as a transient failure.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// A CLI version, `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CliVersion(pub u32, pub u32, pub u32);

/// `auth token --profile` exists from this version on (databricks/cli#855).
pub const VERSION_FOR_PROFILE: CliVersion = CliVersion(0, 207, 1);
/// `auth token --force-refresh` exists from this version on (databricks/cli#4767).
pub const VERSION_FOR_FORCE_REFRESH: CliVersion = CliVersion(0, 296, 0);

/// The version in the output of `databricks version`: `Databricks CLI v0.207.1` (what Go
/// parses), or the JSON of `--output json` with `Major`, `Minor`, `Patch` (what Python parses).
/// `None` when neither: every version-gated flag is then left out, as the SDKs do.
pub fn parse_version(output: &str) -> Option<CliVersion> {
    let output = output.trim();
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Json {
        major: u32,
        minor: u32,
        patch: u32,
    }
    if let Ok(v) = serde_json::from_str::<Json>(output) {
        return Some(CliVersion(v.major, v.minor, v.patch));
    }
    let text = output.strip_prefix("Databricks CLI ").unwrap_or(output);
    let text = text.strip_prefix('v').unwrap_or(text);
    // "0.207.1", or a prerelease / build suffix after '-' or '+'.
    let core = text.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(str::parse::<u32>);
    let version = CliVersion(
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    // A build without version metadata says 0.0.0-dev: it supports nothing for certain.
    (parts.next().is_none() && version != CliVersion(0, 0, 0)).then_some(version)
}

/// Who the token is for: the profile (`--profile`) or, without one or with a CLI too old for
/// it, the host (`--host`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliTarget {
    /// The CLI to run.
    pub cli_path: String,
    /// The profile, if one was named or read.
    pub profile: Option<String>,
    /// The workspace URL.
    pub host: String,
}

impl CliTarget {
    /// The `auth token` command for the CLI at `version`; `force` adds `--force-refresh` where
    /// the version has it. Built as the Go SDK's `buildCliCommand` builds it.
    pub fn token_command(&self, version: Option<CliVersion>, force: bool) -> Vec<String> {
        let mut cmd = vec![self.cli_path.clone(), "auth".to_owned(), "token".to_owned()];
        match &self.profile {
            Some(profile) if version >= Some(VERSION_FOR_PROFILE) => {
                cmd.extend(["--profile".to_owned(), profile.clone()]);
            }
            _ => cmd.extend(["--host".to_owned(), self.host.clone()]),
        }
        if force && version >= Some(VERSION_FOR_FORCE_REFRESH) {
            cmd.push("--force-refresh".to_owned());
        }
        cmd
    }

    /// What a person must run when the CLI can no longer refresh on its own.
    pub fn login_command(&self) -> String {
        match &self.profile {
            Some(profile) => format!("databricks auth login --profile {profile}"),
            None => format!("databricks auth login --host {}", self.host),
        }
    }
}

/// A token from `auth token`.
#[derive(Clone, Debug)]
pub struct CliToken {
    /// The access token, its expiry attached.
    pub token: Token,
    /// When it expires.
    pub expiry: SystemTime,
}

#[derive(Deserialize)]
struct TokenOutput {
    access_token: String,
    #[serde(default)]
    #[allow(dead_code)] // Parsed as the SDKs parse it; the proxy always sends `Bearer`.
    token_type: String,
    expiry: String,
}

/// The JSON `auth token` prints: `access_token`, `token_type`, `expiry`.
pub fn parse_token_output(stdout: &[u8]) -> Result<CliToken, String> {
    // serde_json's messages name a position, never the input.
    let output: TokenOutput = serde_json::from_slice(stdout)
        .map_err(|err| format!("cannot parse the CLI's answer: {err}"))?;
    let expiry = parse_expiry(&output.expiry)
        .ok_or_else(|| format!("cannot parse the token's expiry {:?}", output.expiry))?;
    let token = Token::with_expiry(&output.access_token, expiry)
        .map_err(|err| format!("unusable access token: {err}"))?;
    Ok(CliToken { token, expiry })
}

/// An expiry in any format the SDKs accept: RFC 3339 with or without fractional seconds and
/// with `Z` or an offset, or `YYYY-MM-DD HH:MM:SS[.fraction]` without a zone, read as UTC as Go
/// reads it (`parseExpiry` in `config/cli_token_source.go`; Python's `_parse_expiry` also
/// accepts a `T` without a zone).
pub fn parse_expiry(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (date, rest) = text.split_at_checked(10)?;
    let rest = rest.strip_prefix(['T', 't', ' '])?;
    let mut date_parts = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
    );
    let (time, offset_secs) = if let Some(time) = rest.strip_suffix(['Z', 'z']) {
        (time, 0)
    } else if let Some(at) = rest.rfind(['+', '-']).filter(|at| *at >= 8) {
        let (time, offset) = rest.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = offset[1..].split_once(':')?;
        (
            time,
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
        )
    } else {
        (rest, 0)
    };
    let (hms, fraction) = match time.split_once('.') {
        Some((hms, fraction)) => (hms, fraction),
        None => (time, ""),
    };
    let mut hms_parts = hms.split(':').map(str::parse::<i64>);
    let (hour, minute, second) = (
        hms_parts.next()?.ok()?,
        hms_parts.next()?.ok()?,
        hms_parts.next()?.ok()?,
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || !fraction.chars().all(|c| c.is_ascii_digit())
        || fraction.len() > 9
    {
        return None;
    }
    let nanos: u32 = format!("{fraction:0<9}").parse().ok()?;
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whether the CLI's complaint needs a person: the refresh token expired or was revoked, or
/// there never was a login. The CLI says "refresh token is invalid" and names `auth login`.
pub fn needs_login(stderr: &str) -> bool {
    let text = stderr.to_ascii_lowercase();
    [
        "refresh token is invalid",
        "invalid_grant",
        "auth login",
        "re-authenticate",
        "reauthenticate",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Run `cmd` (program and arguments) with a time limit; its standard output on success.
/// Failures are [`ApiError`]s named `call`: [`ErrorKind::Auth`] when the CLI says a person must
/// log in again, [`ErrorKind::BadRequest`] when the program cannot be started, transient
/// otherwise (a non-zero exit, a timeout).
pub async fn run(call: &str, cmd: &[String], timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let (program, args) = cmd
        .split_first()
        .ok_or_else(|| ApiError::new(ErrorKind::BadRequest, call, "empty command"))?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(timeout, child).await {
        Err(_) => {
            return Err(ApiError::new(
                ErrorKind::Transient,
                call,
                format!("no answer within {} s", timeout.as_secs()),
            ));
        }
        Ok(Err(err)) => {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                call,
                format!("cannot run {program}: {err}"),
            ));
        }
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let kind = if needs_login(&said) {
        ErrorKind::Auth
    } else {
        ErrorKind::Transient
    };
    Err(ApiError::new(
        kind,
        call,
        format!(
            "{}: {}",
            output.status,
            truncate(&redact_credentials(&said), 300)
        ),
    ))
}

/// `text` with anything that may be a credential replaced: a JWT (`eyJ...`), and any run of 32
/// or more letters, digits, `-` and `_` (PATs, refresh and access tokens). The CLI's error
/// output is not ours, and it ends up in errors and logs, which must never hold a token.
pub fn redact_credentials(text: &str) -> String {
    const LONGEST_KEPT: usize = 31;
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_token_char) {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let jwt = rest.starts_with("eyJ");
        let end = rest
            .find(|c: char| !(is_token_char(c) || (jwt && c == '.')))
            .unwrap_or(rest.len());
        let run = &rest[..end];
        if jwt || run.len() > LONGEST_KEPT {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_clis_output_are_redacted() {
        let cases = [
            (
                "Error: refresh token dose0123456789abcdef0123456789abcdef is invalid",
                "Error: refresh token [redacted] is invalid",
            ),
            (
                "bad jwt eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl: rejected",
                "bad jwt [redacted]: rejected",
            ),
            (
                "cannot reach https://adb-1234567890123456.7.azuredatabricks.net: timeout",
                "cannot reach https://adb-1234567890123456.7.azuredatabricks.net: timeout",
            ),
            (
                "run databricks auth login --profile dev",
                "run databricks auth login --profile dev",
            ),
        ];
        for (said, shown) in cases {
            assert_eq!(redact_credentials(said), shown, "{said}");
        }
    }

    fn at(secs: u64, nanos: u32) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::new(secs, nanos))
    }

    #[test]
    fn expiry_formats_of_the_sdks() {
        // 2024-03-20T10:30:00Z is 1710930600.
        let cases: &[(&str, Option<SystemTime>)] = &[
            ("2024-03-20T10:30:00Z", at(1_710_930_600, 0)),
            (
                "2024-03-20T10:30:00.123456789Z",
                at(1_710_930_600, 123_456_789),
            ),
            ("2024-03-20T10:30:00+01:00", at(1_710_927_000, 0)),
            (
                "2024-03-20T10:30:00.5-02:30",
                at(1_710_939_600, 500_000_000),
            ),
            ("2024-03-20 10:30:00", at(1_710_930_600, 0)),
            ("2024-03-20 10:30:00.123", at(1_710_930_600, 123_000_000)),
            ("2024-03-20T10:30:00", at(1_710_930_600, 0)),
            ("2024-02-29T00:00:00Z", at(1_709_164_800, 0)),
            ("2024-13-20T10:30:00Z", None),
            ("20 March 2024", None),
            ("", None),
            ("2024-03-20T10:30:00.12x", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_expiry(text), *want, "{text:?}");
        }
    }

    #[test]
    fn versions() {
        let cases: &[(&str, Option<CliVersion>)] = &[
            ("Databricks CLI v0.207.1\n", Some(CliVersion(0, 207, 1))),
            ("Databricks CLI v0.296.0-rc1", Some(CliVersion(0, 296, 0))),
            (
                r#"{"Major": 0, "Minor": 300, "Patch": 2, "Version": "0.300.2"}"#,
                Some(CliVersion(0, 300, 2)),
            ),
            ("Databricks CLI v0.0.0-dev+abc", None),
            ("Version: 0.17.0", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version(text), *want, "{text:?}");
        }
    }

    #[test]
    fn commands_as_the_sdk_builds_them() {
        let with_profile = CliTarget {
            cli_path: "databricks".to_owned(),
            profile: Some("dev".to_owned()),
            host: "https://h.example.com".to_owned(),
        };
        let without = CliTarget {
            profile: None,
            ..with_profile.clone()
        };
        let cases: &[(&CliTarget, Option<CliVersion>, bool, &str)] = &[
            (
                &with_profile,
                Some(CliVersion(0, 300, 0)),
                true,
                "databricks auth token --profile dev --force-refresh",
            ),
            (
                &with_profile,
                Some(CliVersion(0, 300, 0)),
                false,
                "databricks auth token --profile dev",
            ),
            (
                &with_profile,
                Some(CliVersion(0, 250, 0)),
                true,
                "databricks auth token --profile dev",
            ),
            (
                &with_profile,
                Some(CliVersion(0, 207, 0)),
                true,
                "databricks auth token --host https://h.example.com",
            ),
            (
                &with_profile,
                None,
                true,
                "databricks auth token --host https://h.example.com",
            ),
            (
                &without,
                Some(CliVersion(0, 300, 0)),
                true,
                "databricks auth token --host https://h.example.com --force-refresh",
            ),
        ];
        for (target, version, force, want) in cases {
            assert_eq!(target.token_command(*version, *force).join(" "), *want);
        }
        assert_eq!(
            with_profile.login_command(),
            "databricks auth login --profile dev"
        );
        assert_eq!(
            without.login_command(),
            "databricks auth login --host https://h.example.com"
        );
    }

    #[test]
    fn token_output() {
        let good =
            br#"{"access_token":"eyJ-a","token_type":"Bearer","expiry":"2024-03-20T10:30:00.5Z"}"#;
        let token = parse_token_output(good).unwrap();
        assert_eq!(token.token.expose_secret(), "eyJ-a");
        assert_eq!(Some(token.expiry), at(1_710_930_600, 500_000_000));
        for bad in [
            &b"not json"[..],
            br#"{"access_token":"eyJ-secret-1","token_type":"Bearer"}"#,
            br#"{"access_token":"eyJ-secret-2","token_type":"Bearer","expiry":"soon"}"#,
        ] {
            let err = parse_token_output(bad).unwrap_err();
            assert!(!err.contains("eyJ-secret"), "{err}");
        }
    }

    #[test]
    fn failures_that_need_a_person() {
        assert!(needs_login(
            "Error: a new access token could not be retrieved because the refresh token is invalid. To reauthenticate, run `databricks auth login --profile dev`"
        ));
        assert!(needs_login("oauth2: \"invalid_grant\""));
        assert!(!needs_login("Error: dial tcp: connection refused"));
    }
}
