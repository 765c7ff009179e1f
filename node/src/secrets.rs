//! The node's secrets: the admin token, the payment provider's HMAC key and the
//! master key ring that seals card secrets.
//!
//! Each comes from its setting (env or config file) when present. On the dev default
//! (absent), it is generated once into `<data_dir>/secrets/` (directory 0700, files
//! 0600) with a WARN line naming the file, and read back from there on later starts.
//! A file appears whole or not at all, and one too short to be a secret (say, emptied
//! by hand) stops the node rather than becoming a key anyone can sign with.
//! That folder is beside the RocksDB folder, never inside it: a copy of the database
//! must not carry the key that opens it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keydrop_engine::vault::generate_key_hex;
use keydrop_engine::KeyRing;
use rand::RngCore;

use crate::config::Config;

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
pub const PAYMENT_SECRET_FILE: &str = "payment-secret";
pub const MASTER_KEY_FILE: &str = "master.key";

/// Shortest admin token or payment secret accepted from the operator.
const SECRET_BYTES_MIN: usize = 16;

pub struct Secrets {
    pub admin_token: String,
    pub payment_secret: Vec<u8>,
    pub keys: KeyRing,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets(<redacted>, keys: {:?})", self.keys)
    }
}

pub fn load(config: &Config) -> Result<Secrets> {
    let dir = config.secrets_dir();
    let admin_token = match &config.admin_token {
        Some(token) => checked(token.expose(), "admin token")?,
        None => dev_secret(&dir, ADMIN_TOKEN_FILE, random_token)?,
    };
    let payment_secret = match &config.payment_secret {
        Some(secret) => checked(secret.expose(), "payment secret")?,
        None => dev_secret(&dir, PAYMENT_SECRET_FILE, random_token)?,
    };
    let keys = match (&config.master_key, &config.master_key_file) {
        (Some(text), _) => KeyRing::from_text(text.expose()).context("KEYDROP_MASTER_KEY")?,
        (None, Some(path)) => {
            refuse_inside_db(config, path)?;
            KeyRing::from_file(path)
                .with_context(|| format!("master key file {}", path.display()))?
        }
        (None, None) => {
            let text = dev_secret(&dir, MASTER_KEY_FILE, || generate_key_hex().to_string())?;
            KeyRing::from_text(&text).context("generated master key file")?
        }
    };
    Ok(Secrets {
        admin_token,
        payment_secret: payment_secret.into_bytes(),
        keys,
    })
}

fn checked(value: &str, what: &str) -> Result<String> {
    let value = value.trim();
    if value.len() < SECRET_BYTES_MIN {
        bail!(
            "the {what} holds {} bytes, fewer than the {SECRET_BYTES_MIN} a secret needs",
            value.len()
        );
    }
    Ok(value.to_owned())
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn refuse_inside_db(config: &Config, path: &Path) -> Result<()> {
    let db = config.db_dir();
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if absolute(path).starts_with(absolute(&db)) {
        bail!(
            "the master key file {} is inside the RocksDB folder {}; keep keys apart from the data they open",
            path.display(),
            db.display()
        );
    }
    Ok(())
}

/// Reads `dir/name`, creating it with `generate()` the first time.
fn dev_secret(dir: &Path, name: &str, generate: impl FnOnce() -> String) -> Result<String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let value = match read_secret_file(&path)? {
        Some(value) => value,
        None => {
            let value = generate();
            if write_new_secret_file(dir, &path, &value)? {
                tracing::warn!(
                    file = %path.display(),
                    "generated a development {name}; set it through the environment in production"
                );
                value
            } else {
                // Another node on the same data dir wrote it first: use theirs.
                read_secret_file(&path)?
                    .with_context(|| format!("{} vanished while being read", path.display()))?
            }
        }
    };
    // An empty payment secret would be an HMAC key anyone can sign with.
    checked(&value, name).map_err(|error| {
        anyhow::anyhow!(
            "{}: {error}; delete it to have a new one generated, or set the secret through the environment",
            path.display()
        )
    })
}

fn read_secret_file(path: &PathBuf) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format_args!("{:o}", mode & 0o777), "secret file is readable by others; chmod 600 it");
            }
            Ok(Some(text.trim().to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `value` to `path` only if nothing is there yet; false when another
/// process got there first. The file appears whole or not at all: it is written and
/// synced under a temporary name, then linked into place (a link, unlike a rename,
/// never replaces a secret another node may already have used).
fn write_new_secret_file(dir: &Path, path: &Path, value: &str) -> Result<bool> {
    // A random name, created new: two nodes (two containers can both be pid 1)
    // never write into each other's temporary file.
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret"),
        random_token()
    ));
    let written = (|| -> std::io::Result<bool> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(value.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        let linked = match std::fs::hard_link(&temporary, path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        std::fs::File::open(dir)?.sync_all()?;
        Ok(linked)
    })();
    let _ = std::fs::remove_file(&temporary);
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn generated_once_with_tight_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let first = load(&config).unwrap();
        let second = load(&config).unwrap();
        assert_eq!(first.admin_token, second.admin_token);
        assert_eq!(first.payment_secret, second.payment_secret);
        assert_eq!(first.keys.key_ids(), second.keys.key_ids());
        let secrets_dir = config.secrets_dir();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&secrets_dir), 0o700);
        for name in [ADMIN_TOKEN_FILE, PAYMENT_SECRET_FILE, MASTER_KEY_FILE] {
            assert_eq!(mode(&secrets_dir.join(name)), 0o600, "{name}");
        }
        assert!(
            !config.db_dir().exists(),
            "nothing is written in the RocksDB folder"
        );
    }

    #[test]
    fn a_short_or_empty_secret_file_is_refused_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        load(&config).unwrap();
        let file = config.secrets_dir().join(PAYMENT_SECRET_FILE);
        for text in ["", "\n", "  short  \n"] {
            std::fs::write(&file, text).unwrap();
            let error = load(&config).unwrap_err().to_string();
            assert!(error.contains(PAYMENT_SECRET_FILE), "{error}");
            assert!(error.contains("fewer than the 16"), "{error}");
        }
        // Deleting it, as the message says, gets a new one.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(load(&config).unwrap().payment_secret.len(), 64);
        let leftovers: Vec<_> = std::fs::read_dir(config.secrets_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_secret_written_first_by_another_node_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        assert!(write_new_secret_file(dir.path(), &path, "the-first-node-token").unwrap());
        assert!(!write_new_secret_file(dir.path(), &path, "the-second-node-token").unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "the-first-node-token\n"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn settings_win_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            admin_token: Some(Secret::new("a-long-enough-admin-token")),
            payment_secret: Some(Secret::new("short")),
            ..Config::default()
        };
        assert!(load(&config).is_err());
        let config = Config {
            payment_secret: Some(Secret::new("a-long-enough-payment-secret")),
            master_key: Some(Secret::new(format!(
                "{}\n{}",
                "11".repeat(32),
                "22".repeat(32)
            ))),
            ..config
        };
        let secrets = load(&config).unwrap();
        assert_eq!(secrets.admin_token, "a-long-enough-admin-token");
        assert_eq!(secrets.keys.key_ids().len(), 2);
        assert!(!config.secrets_dir().join(ADMIN_TOKEN_FILE).exists());
    }

    #[test]
    fn master_key_file_inside_db_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            master_key_file: Some(dir.path().join("db/master.key")),
            ..Config::default()
        };
        let error = load(&config).unwrap_err();
        assert!(
            error.to_string().contains("inside the RocksDB folder"),
            "{error}"
        );
    }
}
