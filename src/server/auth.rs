//! Who may call what: bearer keys per role, read from a keys file, compared in constant
//! time. Keys never reach a log line or an error message.

use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// What a key may do. `Admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Stream events in.
    Ingest,
    /// Read risk and alerts.
    Read,
    /// Everything, including retraining and snapshots.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "ingest" => Some(Role::Ingest),
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// Shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

/// A keys-file problem. Says where, never what the key was.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line that is not `ROLE KEY`.
    #[error("{path}: line {line}: {reason}")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why (without the key).
        reason: String,
    },
    /// No key at all.
    #[error("{0}: no keys (lines `ROLE KEY` with ROLE ingest, read or admin)")]
    Empty(PathBuf),
}

/// The keys a server accepts.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<(Role, Box<[u8]>)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys themselves are secrets: show only roles.
        let roles: Vec<&str> = self.keys.iter().map(|(r, _)| r.name()).collect();
        f.debug_struct("Keys").field("roles", &roles).finish()
    }
}

impl Keys {
    /// Read a keys file: one `ROLE KEY` per line, `#` starts a comment.
    pub fn load(path: &Path) -> Result<Keys, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Keys::parse(&text, path)
    }

    /// Parse the text of a keys file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Keys, KeysError> {
        let mut keys: Vec<(Role, Box<[u8]>)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_err = |reason: &str| KeysError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.into(),
            };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(role), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(line_err("expected `ROLE KEY` (two words)"));
            };
            let role = Role::parse(role).ok_or_else(|| {
                line_err(&format!(
                    "unknown role {role:?} (use ingest, read or admin)"
                ))
            })?;
            if key.len() < MIN_KEY_LEN {
                return Err(line_err(&format!(
                    "key is shorter than {MIN_KEY_LEN} characters"
                )));
            }
            if keys
                .iter()
                .any(|(_, k)| bool::from(k.ct_eq(key.as_bytes())))
            {
                return Err(line_err("the same key is given twice"));
            }
            keys.push((role, key.as_bytes().into()));
        }
        if keys.is_empty() {
            return Err(KeysError::Empty(path.to_path_buf()));
        }
        Ok(Keys { keys })
    }

    /// The role of a presented key. Every key is compared, in constant time, whatever
    /// matches, so timing tells nothing about which key came close.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let mut found = None;
        for (role, key) in &self.keys {
            if bool::from(key.as_ref().ct_eq(presented)) {
                found = Some(*role);
            }
        }
        found
    }
}

/// The interceptor of every authenticated service: puts the caller's [`Role`] into the
/// request's extensions, or answers UNAUTHENTICATED. `None` keys = `--insecure-no-auth`.
#[derive(Clone)]
pub struct Authenticate {
    /// Keys accepted; `None` lets everybody in as admin.
    pub keys: Option<std::sync::Arc<Keys>>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let role = match &self.keys {
            None => Role::Admin,
            Some(keys) => {
                let header = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                let presented = header.and_then(|h| {
                    let (scheme, key) = h.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
                });
                let Some(presented) = presented else {
                    tracing::warn!("request without a bearer key refused");
                    return Err(Status::unauthenticated(
                        "missing `authorization: Bearer <key>`",
                    ));
                };
                match keys.role_of(presented.as_bytes()) {
                    Some(r) => r,
                    None => {
                        tracing::warn!("request with an unknown key refused");
                        return Err(Status::unauthenticated("unknown key"));
                    }
                }
            }
        };
        req.extensions_mut().insert(role);
        Ok(req)
    }
}

/// PERMISSION_DENIED unless the caller (authenticated by [`Authenticate`]) has `need`.
pub fn require<T>(req: &Request<T>, need: Role) -> Result<(), Status> {
    match req.extensions().get::<Role>() {
        Some(&r) if r == need || r == Role::Admin => Ok(()),
        Some(&r) => Err(Status::permission_denied(format!(
            "a `{}` key may not do this; it needs the `{}` role",
            r.name(),
            need.name()
        ))),
        // Not reachable through the service stack; refuse rather than trust.
        None => Err(Status::unauthenticated("not authenticated")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_comments_and_refuses_bad_lines() {
        let p = Path::new("keys.txt");
        let k = Keys::parse(
            "# comment\ningest aaaaaaaaaaaaaaaa1\n\nread  bbbbbbbbbbbbbbbb2 # reader\nadmin cccccccccccccccc3\n",
            p,
        )
        .unwrap();
        assert_eq!(k.role_of(b"aaaaaaaaaaaaaaaa1"), Some(Role::Ingest));
        assert_eq!(k.role_of(b"bbbbbbbbbbbbbbbb2"), Some(Role::Read));
        assert_eq!(k.role_of(b"cccccccccccccccc3"), Some(Role::Admin));
        assert_eq!(k.role_of(b"cccccccccccccccc"), None);
        assert_eq!(k.role_of(b""), None);
        let e = Keys::parse("writer dddddddddddddddddd\n", p).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Keys::parse("read short\n", p).unwrap_err().to_string();
        assert!(e.contains("shorter") && !e.contains("short\n"), "{e}");
        assert!(Keys::parse("# nothing\n", p).is_err());
        let e = Keys::parse("read eeeeeeeeeeeeeeeeee\nadmin eeeeeeeeeeeeeeeeee\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && !e.contains("eeee"), "{e}");
        assert!(!format!("{k:?}").contains("aaaa"));
    }
}
