//! Envelope encryption at rest.
//!
//! A master key ([`MasterKey`], the KEK, 32 bytes) wraps random per-object data keys ([`DataKey`], DEKs,
//! 32 bytes) with AES-256-GCM. The store keeps only wrapped DEKs, next to the id of the KEK that wrapped
//! them; unwrapped DEKs live only in process memory and their raw bytes are zeroized on drop. The KEK
//! comes from `CHATSYNC_MASTER_KEY` or `<data_dir>/master.key` (see [`MasterKey::load_or_create`]).
//!
//! Every ciphertext (data or wrapped key) is `[version 1][12-byte random nonce][ciphertext + 16-byte tag]`
//! and is bound by associated data ([`Aad`]) to the row and field it encrypts, so a ciphertext copied to
//! another chat, message, draft or key slot fails to decrypt. Keys and plaintext never appear in `Debug`
//! output or in errors.
//!
//! The keys a cluster's nodes derive from the master key for the traffic they share ([`SharedKey`]: the
//! bus, open streams in Redis) seal far more messages than any data key, for as long as the master key
//! lives: AES-GCM's random 96-bit nonces are good for 2^32 messages per key, which a busy cluster's bus
//! reaches in weeks. They use AES-256-GCM-SIV (RFC 8452),
//! `[version 2][12-byte random nonce][ciphertext + tag]`: it derives the message keys from the nonce
//! and its tag is a synthetic IV, so a random nonce that repeats reveals at most that two messages were
//! identical (no keystream reuse, no forgery), and its limits per key are far beyond what a cluster
//! sends. It runs on the same AES instructions as GCM (~1.4 against ~0.9 µs to seal and open 200 bytes
//! here; XChaCha20-Poly1305 measured 4.4 µs).
//!
//! What it is not: it protects data files, backups and database dumps from someone without the master
//! key. It does not protect against an attacker who can read process memory or the master key, does not
//! hide metadata (ids, sizes, timestamps), and does not stop a stored row from being rolled back to an
//! older ciphertext of the same row and field.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use aes_gcm_siv::Aes256GcmSiv;
use anyhow::Context;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const CHECK_REF: &str = "kek-check";
const PAD_ANY: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, PAD_ANY);
const URL_SAFE_ANY: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, PAD_ANY);

/// Errors from key parsing and decryption. They never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not base64 of exactly 32 bytes.
    #[error("malformed master key: expected base64 of 32 bytes")]
    MalformedKey,
    /// Wrong key, wrong associated data, unknown version, truncated or tampered ciphertext.
    #[error("decryption failed")]
    Decrypt,
    /// The check value stored with the data was not produced by the configured master key.
    #[error("the configured master key is not the one that wrapped the stored keys")]
    WrongMasterKey,
}

/// The master key (KEK): wraps and unwraps [`DataKey`]s. `Debug` prints only its id.
pub struct MasterKey {
    id: String,
    bytes: Zeroizing<[u8; 32]>,
    cipher: Aes256Gcm,
}

impl MasterKey {
    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> MasterKey {
        let digest = Sha256::new().chain_update(b"chatsync-kek-id:v1").chain_update(&bytes[..]).finalize();
        let id = hex::encode(&digest[..8]);
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes[..]));
        MasterKey { id, bytes, cipher }
    }

    /// Parses a base64 (standard or URL-safe, padded or not) encoding of exactly 32 bytes. Surrounding
    /// whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<MasterKey, CryptoError> {
        let text = text.trim();
        let mut buf = Zeroizing::new([0u8; 64]);
        let len = STANDARD_ANY
            .decode_slice(text, &mut buf[..])
            .or_else(|_| URL_SAFE_ANY.decode_slice(text, &mut buf[..]))
            .map_err(|_| CryptoError::MalformedKey)?;
        if len != 32 {
            return Err(CryptoError::MalformedKey);
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&buf[..32]);
        Ok(MasterKey::from_bytes(bytes))
    }

    /// A key derived from this master key for `purpose` (SHA-256 of a domain tag, the purpose and the
    /// key bytes): every node holding the same master key derives the same key, and nothing derived
    /// reveals the master key. Used for the cluster bus ([`Aad::bus`]) and open streams ([`Aad::stream`]).
    pub fn derive(&self, purpose: &str) -> SharedKey {
        let digest = Sha256::new()
            .chain_update(b"chatsync-derive:v1:")
            .chain_update(purpose.as_bytes())
            .chain_update([0u8])
            .chain_update(&self.bytes[..])
            .finalize();
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&digest);
        SharedKey::from_bytes(bytes)
    }

    /// A new random key.
    pub fn generate() -> MasterKey {
        MasterKey::from_bytes(random_key())
    }

    /// Base64 (standard, padded) encoding of the key, for writing a key file or printing a new key.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.bytes[..]))
    }

    /// The key id: first 16 hex chars of SHA-256("chatsync-kek-id:v1" || key bytes). Stable, reveals
    /// nothing useful about the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads the master key. `env_value` (the `CHATSYNC_MASTER_KEY` variable, base64) wins when `Some`;
    /// otherwise reads `<data_dir>/master.key` (base64, trailing whitespace allowed; it may be a symlink to
    /// the key file). When that file does not exist, creates `data_dir` and the file with a new random key
    /// and returns `created = true`: the key is written whole to a temporary file (mode 0600, flushed to
    /// disk), hard-linked as `master.key` (so that a crash never leaves a partial key file, and a key another
    /// process created meanwhile wins and is read instead), and the directory entry flushed; a later load
    /// removes a temporary name a crash left linked to the key. A key file readable by group or others is
    /// rejected, and so is a `master.key` symlink to a file that does not exist (the key it pointed to is
    /// missing: a new key would not open the data stored under it).
    pub fn load_or_create(data_dir: &Path, env_value: Option<&str>) -> anyhow::Result<(MasterKey, bool)> {
        if let Some(value) = env_value {
            let key = MasterKey::from_base64(value).context("invalid CHATSYNC_MASTER_KEY")?;
            return Ok((key, false));
        }
        let path = data_dir.join("master.key");
        if existing_master_key(&path)? {
            return Ok((read_key_file(data_dir, &path)?, false));
        }
        crate::datadir::create_private_dir(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let key = MasterKey::generate();
        // Written whole under a name of its own, then linked into place: a crash mid-write leaves no empty
        // or partial `master.key` behind (only a stray file that nothing reads), and the link, unlike a
        // rename, fails when another process created `master.key` meanwhile.
        let mut nonce = [0u8; 8];
        OsRng.fill_bytes(&mut nonce);
        let temp = data_dir.join(format!("master.key.new-{}", hex::encode(nonce)));
        let written = write_new_key_file(&temp, &key);
        let linked = written.and_then(|()| std::fs::hard_link(&temp, &path));
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            // Another process created the key first: that one is the key. Read once, not retried: whatever
            // is there now (a key, a dangling symlink, nothing) gives a key or an error.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok((read_key_file(data_dir, &path)?, false)),
            Err(e) => return Err(e).with_context(|| format!("cannot write master key file {}", path.display())),
        }
        // The file's own fsync does not make its directory entry durable.
        crate::datadir::sync_dir(data_dir)?;
        Ok((key, true))
    }

    /// Wraps a data key for the slot named `key_ref` (e.g. `"chat:abc"`); the AD binds it to `key_ref`.
    pub fn wrap(&self, dek: &DataKey, key_ref: &str) -> Vec<u8> {
        seal(&self.cipher, VERSION, &dek.bytes[..], &Aad::dek(key_ref))
    }

    /// Unwraps; [`CryptoError::Decrypt`] if the key is wrong, the blob was altered, or `key_ref` differs.
    pub fn unwrap(&self, wrapped: &[u8], key_ref: &str) -> Result<DataKey, CryptoError> {
        let plain = open(&self.cipher, VERSION, wrapped, &Aad::dek(key_ref))?;
        let bytes: [u8; 32] = plain[..].try_into().map_err(|_| CryptoError::Decrypt)?;
        Ok(DataKey::from_bytes(Zeroizing::new(bytes)))
    }

    /// A check value proving which master key is configured: the wrap of an all-zero data key under
    /// key_ref `"kek-check"`.
    pub fn check_value(&self) -> Vec<u8> {
        self.wrap(&DataKey::from_bytes(Zeroizing::new([0; 32])), CHECK_REF)
    }

    /// `Ok(())` when `check` is a [`MasterKey::check_value`] of this key, [`CryptoError::WrongMasterKey`]
    /// otherwise.
    pub fn verify_check(&self, check: &[u8]) -> Result<(), CryptoError> {
        match self.unwrap(check, CHECK_REF) {
            Ok(dek) if *dek.bytes == [0; 32] => Ok(()),
            _ => Err(CryptoError::WrongMasterKey),
        }
    }
}

/// Whether the key file `path` exists, judged by the directory entry itself (not followed): `false` only
/// when there is no entry, so that a key is created only where there is none. An entry that is a symlink
/// to a file that does not exist is an error naming the path and the target: the key it pointed to is
/// missing (an unmounted volume, a moved file), and creating a key through or beside the link would
/// replace it with one that cannot open the stored data.
fn existing_master_key(path: &Path) -> anyhow::Result<bool> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(entry) if entry.file_type().is_symlink() => match std::fs::metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
                anyhow::bail!(
                    "master key file {shown} is a symlink to {target:?}, which does not exist; restore the key \
                     file it points to (a new key could not open the data stored under the missing one)"
                )
            }
            Err(e) => Err(e).with_context(|| format!("cannot open master key file {shown}")),
        },
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot open master key file {shown}")),
    }
}

/// Reads the key file `path` (following a symlink) in `data_dir`: refused when group or others may read
/// it; the temporary names a crash left linked to it are removed afterwards ([`remove_stray_links`]).
fn read_key_file(data_dir: &Path, path: &Path) -> anyhow::Result<MasterKey> {
    let shown = path.display();
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => {
            if e.kind() == ErrorKind::NotFound {
                // A dangling symlink put in place since it was checked: the same error as at the check.
                existing_master_key(path)?;
            }
            return Err(e).with_context(|| format!("cannot open master key file {shown}"));
        }
    };
    let mode = file.metadata().with_context(|| format!("cannot stat {shown}"))?.permissions().mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "master key file {shown} is accessible by group/others (mode {:o}); run `chmod 600 {shown}`",
            mode & 0o777
        );
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).with_context(|| format!("cannot read master key file {shown}"))?;
    let key = MasterKey::from_base64(&text)
        .with_context(|| format!("master key file {shown} does not contain a valid key"))?;
    remove_stray_links(data_dir, &file);
    Ok(key)
}

/// Removes the temporary names of `master.key` (`master.key.new-*` linked to the same file) that a crash
/// between linking the key into place and removing its temporary name left behind: a second copy of the
/// key that an operator moving the key out of the directory would not know of. Best effort (a read-only
/// directory keeps them). Temporary files of another inode hold keys that never encrypted anything (or are
/// a concurrent creator's, about to be linked) and are left alone.
fn remove_stray_links(data_dir: &Path, key_file: &std::fs::File) {
    use std::os::unix::fs::MetadataExt;
    let Ok(key) = key_file.metadata() else { return };
    if key.nlink() < 2 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        let stray = entry.file_name().to_str().is_some_and(|n| n.starts_with("master.key.new-"))
            && entry.metadata().is_ok_and(|m| m.dev() == key.dev() && m.ino() == key.ino());
        if stray {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `key` to a new file at `path` (mode 0600) and flushes it to disk. The text and the newline are
/// written one after the other: appending the newline to the text could move it to a larger buffer and
/// free the old one without zeroizing it, leaving a copy of the key in freed heap memory.
fn write_new_key_file(path: &Path, key: &MasterKey) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let text = key.to_base64();
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A data key (DEK): encrypts field values. Raw bytes are zeroized on drop; `Debug` prints `DataKey(..)`.
pub struct DataKey {
    bytes: Zeroizing<[u8; 32]>,
    cipher: Aes256Gcm,
}

impl DataKey {
    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> DataKey {
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes[..]));
        DataKey { bytes, cipher }
    }

    /// A new random data key.
    pub fn generate() -> DataKey {
        DataKey::from_bytes(random_key())
    }

    /// Encrypts with a fresh random 96-bit nonce. Output: `[version 1][12-byte nonce][ciphertext + tag]`.
    pub fn encrypt(&self, plaintext: &[u8], ad: &Aad) -> Vec<u8> {
        seal(&self.cipher, VERSION, plaintext, ad)
    }

    /// Decrypts; [`CryptoError::Decrypt`] on a wrong key, wrong AD, unknown version, truncation or tampering.
    pub fn decrypt(&self, ciphertext: &[u8], ad: &Aad) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.cipher, VERSION, ciphertext, ad)
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A key the nodes of a cluster derive alike ([`MasterKey::derive`]) for the traffic they share. Seals
/// with AES-256-GCM-SIV (see the module doc); opens that and, for what nodes of an earlier version
/// sealed, AES-256-GCM under the same key bytes. `Debug` prints `SharedKey(..)`.
pub struct SharedKey {
    cipher: Aes256GcmSiv,
    /// Opens version-1 ciphertexts (sealed before the shared keys used AES-GCM-SIV).
    legacy: DataKey,
}

/// The version byte of [`SharedKey`] ciphertexts.
const SHARED_VERSION: u8 = 2;

impl SharedKey {
    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> SharedKey {
        let cipher = Aes256GcmSiv::new(aes_gcm_siv::Key::<Aes256GcmSiv>::from_slice(&bytes[..]));
        SharedKey { cipher, legacy: DataKey::from_bytes(bytes) }
    }

    /// Encrypts with a fresh random 96-bit nonce. Output: `[version 2][12-byte nonce][ciphertext + tag]`.
    pub fn encrypt(&self, plaintext: &[u8], ad: &Aad) -> Vec<u8> {
        seal(&self.cipher, SHARED_VERSION, plaintext, ad)
    }

    /// Decrypts a version-2 ciphertext, or a version-1 one of an earlier node; [`CryptoError::Decrypt`]
    /// on a wrong key, wrong AD, unknown version, truncation or tampering.
    pub fn decrypt(&self, ciphertext: &[u8], ad: &Aad) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        match ciphertext.first() {
            Some(&VERSION) => self.legacy.decrypt(ciphertext, ad),
            _ => open(&self.cipher, SHARED_VERSION, ciphertext, ad),
        }
    }
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

/// Associated data: what a ciphertext is bound to. Encoded unambiguously as length-prefixed parts after
/// the domain prefix `"chatsync:v1"` and a field name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aad(Vec<u8>);

impl Aad {
    fn new(parts: &[&str]) -> Aad {
        let mut out = Vec::new();
        for part in std::iter::once(&"chatsync:v1").chain(parts) {
            out.extend_from_slice(&u32::try_from(part.len()).expect("AD part too long").to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        Aad(out)
    }

    /// The title of chat `chat_id`.
    pub fn title(chat_id: &str) -> Aad {
        Aad::new(&["title", chat_id])
    }

    /// The body of message `message_id` in chat `chat_id`.
    pub fn message(chat_id: &str, message_id: &str) -> Aad {
        Aad::new(&["message", chat_id, message_id])
    }

    /// The draft of user `user_id` in chat `chat_id`.
    pub fn draft(chat_id: &str, user_id: &str) -> Aad {
        Aad::new(&["draft", chat_id, user_id])
    }

    /// A message on cluster bus channel `channel`.
    pub fn bus(channel: &str) -> Aad {
        Aad::new(&["bus", channel])
    }

    /// The body of webhook event `event_id` of user `user_id` (SERVER_API.md section 5).
    pub fn webhook(user_id: &str, event_id: &str) -> Aad {
        Aad::new(&["webhook", user_id, event_id])
    }

    /// A part (`field`) of the open stream stored under `stream` (its Redis key), see `streams/redis.rs`.
    pub fn stream(stream: &str, field: &str) -> Aad {
        Aad::new(&["stream", stream, field])
    }

    fn dek(key_ref: &str) -> Aad {
        Aad::new(&["dek", key_ref])
    }
}

fn random_key() -> Zeroizing<[u8; 32]> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut bytes[..]);
    bytes
}

/// `[version][12-byte random nonce][ciphertext + tag]` under `cipher` (AES-256-GCM or AES-256-GCM-SIV).
fn seal<C: Aead + AeadCore<NonceSize = U12>>(cipher: &C, version: u8, plaintext: &[u8], ad: &Aad) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &ad.0 })
        .expect("AES-GCM(-SIV) encryption cannot fail below 64 GiB");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(version);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens what [`seal`] made with `version` under `cipher`.
fn open<C: Aead + AeadCore<NonceSize = U12>>(
    cipher: &C,
    version: u8,
    data: &[u8],
    ad: &Aad,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if data.len() < 1 + NONCE_LEN + TAG_LEN || data[0] != version {
        return Err(CryptoError::Decrypt);
    }
    let (nonce, sealed) = data[1..].split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &ad.0 })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_random_nonce() {
        let dek = DataKey::generate();
        let ad = Aad::message("c1", "m1");
        let a = dek.encrypt(b"hello", &ad);
        let b = dek.encrypt(b"hello", &ad);
        assert_ne!(a, b);
        assert_eq!(a.len(), 1 + NONCE_LEN + 5 + TAG_LEN);
        assert_eq!(&dek.decrypt(&a, &ad).unwrap()[..], b"hello");
        assert_eq!(&dek.decrypt(&b, &ad).unwrap()[..], b"hello");
        assert_eq!(&dek.decrypt(&dek.encrypt(b"", &ad), &ad).unwrap()[..], b"");
    }

    #[test]
    fn wrong_ad_fails() {
        let dek = DataKey::generate();
        let cases = [
            (Aad::title("a"), Aad::title("b")),
            (Aad::message("a", "m1"), Aad::message("a", "m2")),
            (Aad::message("a", "m1"), Aad::message("b", "m1")),
            (Aad::draft("a", "alice"), Aad::draft("a", "bob")),
            (Aad::title("a"), Aad::message("a", "")),
            (Aad::message("a", "b"), Aad::draft("a", "b")),
            (Aad::message("ab", "c"), Aad::message("a", "bc")),
        ];
        for (good, bad) in cases {
            assert_ne!(good, bad);
            let ct = dek.encrypt(b"secret", &good);
            assert!(matches!(dek.decrypt(&ct, &bad), Err(CryptoError::Decrypt)), "{good:?} vs {bad:?}");
        }
    }

    #[test]
    fn tampered_truncated_or_wrong_key_fails() {
        let dek = DataKey::generate();
        let ad = Aad::title("c");
        let ct = dek.encrypt(b"some plaintext", &ad);
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            assert!(dek.decrypt(&bad, &ad).is_err(), "byte {i}");
        }
        for len in 0..ct.len() {
            assert!(dek.decrypt(&ct[..len], &ad).is_err(), "len {len}");
        }
        assert!(matches!(DataKey::generate().decrypt(&ct, &ad), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn shared_keys_seal_with_gcm_siv_and_open_what_earlier_nodes_sealed() {
        let master = MasterKey::generate();
        let (bus, again, streams) = (master.derive("bus"), master.derive("bus"), master.derive("streams"));
        let ad = Aad::bus("p:u:alice");
        let a = bus.encrypt(b"hello", &ad);
        assert_eq!((a[0], a.len()), (SHARED_VERSION, 1 + NONCE_LEN + 5 + TAG_LEN));
        assert_ne!(a, bus.encrypt(b"hello", &ad));
        assert_eq!(&again.decrypt(&a, &ad).unwrap()[..], b"hello", "every node derives the same key");
        assert!(streams.decrypt(&a, &ad).is_err(), "a key per purpose");
        assert!(again.decrypt(&a, &Aad::bus("p:u:bob")).is_err());
        for i in 0..a.len() {
            let mut bad = a.clone();
            bad[i] ^= 0x01;
            assert!(again.decrypt(&bad, &ad).is_err(), "byte {i}");
        }
        for len in 0..a.len() {
            assert!(again.decrypt(&a[..len], &ad).is_err(), "len {len}");
        }
        // What a node of an earlier version sealed: AES-256-GCM under the same derived bytes.
        let old = bus.legacy.encrypt(b"from before", &ad);
        assert_eq!(old[0], VERSION);
        assert_eq!(&again.decrypt(&old, &ad).unwrap()[..], b"from before");
        assert!(again.decrypt(&old, &Aad::bus("p:u:bob")).is_err());
        assert_eq!(format!("{bus:?}"), "SharedKey(..)");
    }

    #[test]
    fn wrap_unwrap_and_check_value() {
        let kek = MasterKey::generate();
        let other = MasterKey::generate();
        let dek = DataKey::generate();
        let wrapped = kek.wrap(&dek, "chat:abc");
        let back = kek.unwrap(&wrapped, "chat:abc").unwrap();
        let ct = dek.encrypt(b"x", &Aad::title("abc"));
        assert_eq!(&back.decrypt(&ct, &Aad::title("abc")).unwrap()[..], b"x");
        assert!(matches!(kek.unwrap(&wrapped, "chat:abd"), Err(CryptoError::Decrypt)));
        assert!(matches!(other.unwrap(&wrapped, "chat:abc"), Err(CryptoError::Decrypt)));

        let check = kek.check_value();
        kek.verify_check(&check).unwrap();
        assert!(matches!(other.verify_check(&check), Err(CryptoError::WrongMasterKey)));
        assert!(matches!(kek.verify_check(&kek.wrap(&dek, CHECK_REF)), Err(CryptoError::WrongMasterKey)));
    }

    #[test]
    fn from_base64_variants() {
        let bytes: Vec<u8> = (0..32).map(|i| 0xf0 | i).collect();
        let id = MasterKey::from_base64(&STANDARD.encode(&bytes)).unwrap().id().to_owned();
        assert_eq!(id.len(), 16);
        for engine in [base64::prelude::BASE64_STANDARD_NO_PAD, base64::prelude::BASE64_URL_SAFE] {
            assert_eq!(MasterKey::from_base64(&engine.encode(&bytes)).unwrap().id(), id);
        }
        let key = MasterKey::from_base64(&base64::prelude::BASE64_URL_SAFE_NO_PAD.encode(&bytes)).unwrap();
        assert_eq!(MasterKey::from_base64(&key.to_base64()).unwrap().id(), key.id());
        for bad in [STANDARD.encode([7u8; 31]), STANDARD.encode([7u8; 33]), "not base64!".into(), String::new()] {
            assert!(matches!(MasterKey::from_base64(&bad), Err(CryptoError::MalformedKey)), "{bad}");
        }
    }

    #[test]
    fn load_or_create_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let (key, created) = MasterKey::load_or_create(&data, None).unwrap();
        assert!(created);
        let path = data.join("master.key");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The temporary file it was written to is gone: the key is in the data directory once.
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["master.key"]);
        let (again, created) = MasterKey::load_or_create(&data, None).unwrap();
        assert!(!created);
        assert_eq!(again.id(), key.id());
        // A crash between the link and the removal of the temporary name left a second name of the key;
        // one before the link left a file of a key never used. The next start removes the first only.
        std::fs::hard_link(&path, data.join("master.key.new-0123456789abcdef")).unwrap();
        std::fs::write(data.join("master.key.new-fedcba9876543210"), "unused\n").unwrap();
        let (again, _) = MasterKey::load_or_create(&data, None).unwrap();
        assert_eq!(again.id(), key.id());
        let mut names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["master.key", "master.key.new-fedcba9876543210"]);
        std::fs::remove_file(data.join("master.key.new-fedcba9876543210")).unwrap();

        let env = MasterKey::generate();
        let (from_env, created) = MasterKey::load_or_create(&data, Some(&env.to_base64())).unwrap();
        assert!(!created);
        assert_eq!(from_env.id(), env.id());
        let err = MasterKey::load_or_create(&data, Some("nope")).unwrap_err();
        assert!(format!("{err:#}").contains("CHATSYNC_MASTER_KEY"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", MasterKey::load_or_create(&data, None).unwrap_err());
        assert!(err.contains("chmod 600") && err.contains("master.key"), "{err}");
        assert!(!err.contains(key.to_base64().as_str()));

        std::fs::write(&path, "garbage\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = format!("{:#}", MasterKey::load_or_create(&data, None).unwrap_err());
        assert!(err.contains("master.key") && err.contains("malformed master key"), "{err}");
    }

    #[test]
    fn load_or_create_refuses_a_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // The key lives elsewhere (a volume not mounted, a file moved away): the link points nowhere.
        let target = dir.path().join("keys/master.key");
        std::os::unix::fs::symlink(&target, data.join("master.key")).unwrap();
        for _ in 0..2 {
            let err = format!("{:#}", MasterKey::load_or_create(&data, None).unwrap_err());
            assert!(err.contains("data/master.key") && err.contains("keys/master.key"), "{err}");
            assert!(err.contains("does not exist"), "{err}");
        }
        // No key created through the link nor beside it.
        assert!(!dir.path().join("keys").exists());
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["master.key"]);
        assert_eq!(std::fs::read_link(data.join("master.key")).unwrap(), target);
        // The variable still wins over the file.
        let env = MasterKey::generate();
        assert_eq!(MasterKey::load_or_create(&data, Some(&env.to_base64())).unwrap().0.id(), env.id());
    }

    #[test]
    fn load_or_create_reads_a_key_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = MasterKey::load_or_create(&dir.path().join("keys"), None).unwrap();
        assert!(created);
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink("../keys/master.key", data.join("master.key")).unwrap();
        let (again, created) = MasterKey::load_or_create(&data, None).unwrap();
        assert!(!created);
        assert_eq!(again.id(), key.id());
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["master.key"]);
        // The mode checked is the key file's, not the link's.
        let file = dir.path().join("keys/master.key");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", MasterKey::load_or_create(&data, None).unwrap_err());
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn debug_hides_keys() {
        let kek = MasterKey::generate();
        let shown = format!("{kek:?}");
        assert!(shown.contains(kek.id()) && !shown.contains(kek.to_base64().as_str()), "{shown}");
        let dek = DataKey::generate();
        let b64 = STANDARD.encode(&dek.bytes[..]);
        let shown = format!("{dek:?}");
        assert_eq!(shown, "DataKey(..)");
        assert!(!shown.contains(&b64) && !format!("{:?}", kek.unwrap(&kek.wrap(&dek, "k"), "k")).contains(&b64));
    }
}
