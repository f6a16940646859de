//! Environment secrets at rest: sealed with the operator's key before they reach the store.
//!
//! A secret is stored as `jhs1:<key fingerprint>:<hex of nonce ‖ ciphertext ‖ tag>`, sealed
//! with ChaCha20-Poly1305 (ring) under a 256-bit key the operator provides. The additional data
//! is the environment id and the secret's name, so a sealed value copied to another secret or
//! environment does not open. The fingerprint names the key a value was sealed with, so a host
//! started with another key says so instead of failing to decrypt.
//!
//! What this protects: the database files, their backups and copies, and anyone who can read
//! the store but not the key. What it does not: a running host holds the key in memory, and a
//! plugin granted a secret sees its value.

use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::{Error, Result, StoreError};

/// The prefix of a sealed value; a stored value without it was written before secrets were
/// sealed and is sealed when a host with a key starts ([`crate::Engine::seal_secrets`]).
const SEALED: &str = "jhs1:";

/// A 256-bit key that seals environment secrets. Its bytes are wiped when dropped and never
/// printed: `Debug` shows the fingerprint.
#[derive(Clone)]
pub struct SecretKey {
    bytes: Zeroizing<[u8; 32]>,
    fingerprint: String,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.fingerprint)
    }
}

impl SecretKey {
    fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut material = Zeroizing::new(b"jobhost secret key v1\0".to_vec());
        material.extend_from_slice(&bytes);
        Self { fingerprint: crate::model::sha256_hex(&material, 8), bytes: Zeroizing::new(bytes) }
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| StoreError::new("cannot read random bytes for a key"))?;
        let key = Self::from_bytes(bytes);
        bytes.fill(0);
        Ok(key)
    }

    /// A key written as 64 hex digits (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = || {
            Error::invalid(format!(
                "a secret key is 64 hex digits (32 bytes), not {} characters; make one with `jobhost secret new-key`",
                text.chars().count()
            ))
        };
        if text.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            bytes[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        let key = Self::from_bytes(bytes);
        bytes.fill(0);
        Ok(key)
    }

    /// A key from a file only its owner can read (mode 0600 or 0400 on Unix): a key readable
    /// by others protects nothing, so such a file is refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        let unreadable =
            |e: std::io::Error| Error::invalid(format!("cannot read the key file {}: {e}", path.display()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(unreadable)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::invalid(format!(
                    "the key file {} can be read by others (mode {mode:04o}); run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(unreadable)?);
        Self::parse(&text).map_err(|e| Error::invalid(format!("the key file {}: {}", path.display(), reason(&e))))
    }

    /// The key as 64 hex digits, for writing it to a key file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(self.bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A short, non-secret name of the key (16 hex digits of a hash of it), stored with each
    /// value it seals.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.bytes[..]).expect("a 32-byte key"))
    }

    /// Seals `value` as the secret `name` of environment `env`.
    pub fn seal(&self, env: &str, name: &str, value: &str) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        // Random 96-bit nonces: a store holds far fewer sealed values than would make a repeat
        // likely (about 2^32 under one key).
        SystemRandom::new().fill(&mut nonce).map_err(|_| StoreError::new("cannot read random bytes for a nonce"))?;
        let mut data = value.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad(env, name).as_aad(), &mut data)
            .map_err(|_| StoreError::new("cannot seal a secret"))?;
        let mut out = String::with_capacity(SEALED.len() + 17 + 2 * (NONCE_LEN + data.len()));
        out.push_str(SEALED);
        out.push_str(&self.fingerprint);
        out.push(':');
        for b in nonce.iter().chain(&data) {
            out.push_str(&format!("{b:02x}"));
        }
        Ok(out)
    }

    /// Opens the stored value of the secret `name` of environment `env`.
    pub fn open(&self, env: &str, name: &str, stored: &str) -> Result<String> {
        let Some(sealed_with) = sealed_with(stored) else {
            return Ok(stored.to_owned());
        };
        if sealed_with != self.fingerprint {
            return Err(wrong_key(name, sealed_with, Some(self)));
        }
        let damaged =
            || Error::Conflict(format!("secret {name} is damaged in the store: it does not open with its key"));
        let body = stored.get(SEALED.len() + self.fingerprint.len() + 1..).unwrap_or_default();
        if !body.len().is_multiple_of(2) || body.len() < 2 * NONCE_LEN {
            return Err(damaged());
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(body.len() / 2));
        for pair in body.as_bytes().chunks(2) {
            let pair = std::str::from_utf8(pair).map_err(|_| damaged())?;
            bytes.push(u8::from_str_radix(pair, 16).map_err(|_| damaged())?);
        }
        let (nonce, sealed) = bytes.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let opened = self.aead().open_in_place(nonce, aad(env, name).as_aad(), sealed).map_err(|_| damaged())?;
        String::from_utf8(opened.to_vec()).map_err(|_| damaged())
    }
}

/// The fingerprint of the key `stored` was sealed with; `None` for a value stored before
/// secrets were sealed.
pub fn sealed_with(stored: &str) -> Option<&str> {
    stored.strip_prefix(SEALED).map(|rest| rest.split(':').next().unwrap_or(""))
}

/// Opens `stored` with `key`, or says why it cannot be.
pub(crate) fn open(key: Option<&SecretKey>, env: &str, name: &str, stored: &str) -> Result<String> {
    match (key, sealed_with(stored)) {
        (_, None) => Ok(stored.to_owned()),
        (Some(key), Some(_)) => key.open(env, name, stored),
        (None, Some(fingerprint)) => Err(wrong_key(name, fingerprint, None)),
    }
}

pub(crate) fn wrong_key(name: &str, sealed_with: &str, key: Option<&SecretKey>) -> Error {
    Error::Conflict(match key {
        Some(key) => format!(
            "secret {name} was sealed with key {sealed_with}, and this host's key is {}; \
             start it with the key the secrets were sealed with",
            key.fingerprint()
        ),
        None => format!(
            "secret {name} is sealed with key {sealed_with}, and this host has no secret key; \
             set JOBHOST_SECRET_KEY or JOBHOST_SECRET_KEY_FILE (or --secret-key-file)"
        ),
    })
}

/// The refusal to store a secret on a host without a key.
pub(crate) fn no_key() -> Error {
    Error::Conflict(
        "this host has no secret key, and secrets are only stored sealed; set JOBHOST_SECRET_KEY or \
         JOBHOST_SECRET_KEY_FILE (or --secret-key-file), made with `jobhost secret new-key`"
            .into(),
    )
}

/// An error's message without the kind's prefix (`invalid input: `), for a message that
/// names its own source (a key file, a variable).
pub fn reason(e: &Error) -> String {
    match e {
        Error::Invalid(m) => m.clone(),
        e => e.to_string(),
    }
}

struct AadBytes(Vec<u8>);

impl AadBytes {
    fn as_aad(&self) -> Aad<&[u8]> {
        Aad::from(&self.0[..])
    }
}

fn aad(env: &str, name: &str) -> AadBytes {
    let mut a = Vec::with_capacity(env.len() + name.len() + 1);
    a.extend_from_slice(env.as_bytes());
    a.push(0);
    a.extend_from_slice(name.as_bytes());
    AadBytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_environment_and_name() {
        let key = SecretKey::generate().unwrap();
        let sealed = key.seal("env_a", "API_KEY", "s3cret value ✓").unwrap();
        assert!(!sealed.contains("s3cret"), "{sealed}");
        assert_eq!(sealed_with(&sealed), Some(key.fingerprint()));
        assert_eq!(key.open("env_a", "API_KEY", &sealed).unwrap(), "s3cret value ✓");
        assert_ne!(sealed, key.seal("env_a", "API_KEY", "s3cret value ✓").unwrap(), "a fresh nonce each time");
        for (env, name) in [("env_b", "API_KEY"), ("env_a", "OTHER")] {
            let err = key.open(env, name, &sealed).unwrap_err().to_string();
            assert!(err.contains("damaged"), "moved to {env}/{name}: {err}");
        }
        let other = SecretKey::generate().unwrap();
        let err = other.open("env_a", "API_KEY", &sealed).unwrap_err().to_string();
        assert!(err.contains(key.fingerprint()) && err.contains(other.fingerprint()), "{err}");
        let err = open(None, "env_a", "API_KEY", &sealed).unwrap_err().to_string();
        assert!(err.contains("has no secret key"), "{err}");
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let err = key.open("env_a", "API_KEY", &String::from_utf8(flipped).unwrap()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        for cut in [format!("jhs1:{}", key.fingerprint()), format!("jhs1:{}:00", key.fingerprint())] {
            assert!(key.open("env_a", "API_KEY", &cut).unwrap_err().to_string().contains("damaged"), "{cut}");
        }
        assert_eq!(open(None, "env_a", "API_KEY", "written before sealing").unwrap(), "written before sealing");
    }

    #[test]
    fn keys_parse_from_hex_and_files_readable_by_others_are_refused() {
        let key = SecretKey::generate().unwrap();
        let again = SecretKey::parse(&format!("  {}\n", &*key.to_hex())).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert!(!format!("{key:?}").contains(&*key.to_hex()), "Debug never prints the key");
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(66)] {
            assert!(SecretKey::parse(bad).unwrap_err().to_string().contains("64 hex digits"), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, &*key.to_hex()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = SecretKey::from_file(&path).unwrap_err().to_string();
            assert!(err.contains("can be read by others (mode 0644)") && err.contains("chmod 600"), "{err}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(SecretKey::from_file(&path).unwrap().fingerprint(), key.fingerprint());
        let err = SecretKey::from_file(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("cannot read the key file"), "{err}");
    }
}
