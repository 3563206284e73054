//! Fuzz target `open_ciphertext`: AES-256-GCM opening in `chatsync::crypto` under fixed keys.
//!
//! * Raw: arbitrary bytes decrypted with arbitrary associated data (title, message, draft) under a fixed
//!   data key, unwrapped under a fixed master key, and checked as a check value: never a panic, never a
//!   success (nothing here was produced by the keys, so a success would be a forgery).
//! * Tamper: the fuzzer's plaintext is sealed under the fuzzer's AD, then the fuzzer's edits (bit flips,
//!   truncation, appended bytes, another AD) are applied: the unchanged pair must open to the plaintext,
//!   any changed pair must fail.
//! * Master key parsing (`MasterKey::from_base64`) of the raw input as text never panics.
//!
//! The fixed data key is the all-zero key inside the master key's check value, so runs are reproducible
//! up to the random nonce.
#![no_main]

use chatsync::crypto::{Aad, DataKey, MasterKey};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn keys() -> &'static (MasterKey, DataKey) {
    static KEYS: OnceLock<(MasterKey, DataKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let kek = MasterKey::from_base64(KEK).expect("a valid fixed key");
        let dek = kek.unwrap(&kek.check_value(), "kek-check").expect("the check value unwraps");
        (kek, dek)
    })
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
enum Ad {
    Title(String),
    Message(String, String),
    Draft(String, String),
}

impl Ad {
    fn aad(&self) -> Aad {
        match self {
            Ad::Title(c) => Aad::title(c),
            Ad::Message(c, m) => Aad::message(c, m),
            Ad::Draft(c, u) => Aad::draft(c, u),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Flip { index: u16, bit: u8 },
    Truncate(u16),
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw { data: Vec<u8>, ad: Ad, key_ref: String },
    Tamper { plaintext: Vec<u8>, ad: Ad, edits: Vec<Edit>, open_with: Option<Ad> },
}

fuzz_target!(|input: Input| {
    let (kek, dek) = keys();
    match input {
        Input::Raw { data, ad, key_ref } => {
            assert!(dek.decrypt(&data, &ad.aad()).is_err(), "forged ciphertext opened");
            assert!(kek.unwrap(&data, &key_ref).is_err(), "forged wrapped key opened");
            assert!(kek.verify_check(&data).is_err(), "forged check value accepted");
            if let Ok(text) = std::str::from_utf8(&data) {
                let _ = MasterKey::from_base64(text);
            }
        }
        Input::Tamper { plaintext, ad, edits, open_with } => {
            let sealed = dek.encrypt(&plaintext, &ad.aad());
            let mut ct = sealed.clone();
            for edit in edits.iter().take(8) {
                match edit {
                    Edit::Flip { index, bit } if !ct.is_empty() => {
                        let i = *index as usize % ct.len();
                        ct[i] ^= 1 << (bit % 8);
                    }
                    Edit::Flip { .. } => {}
                    Edit::Truncate(n) => ct.truncate(*n as usize),
                    Edit::Append(extra) => ct.extend_from_slice(extra),
                }
            }
            let open_ad = open_with.unwrap_or_else(|| ad.clone());
            let result = dek.decrypt(&ct, &open_ad.aad());
            if ct == sealed && open_ad.aad() == ad.aad() {
                assert_eq!(&result.expect("an untouched ciphertext opens")[..], &plaintext[..]);
            } else {
                assert!(result.is_err(), "tampered ciphertext or changed AD opened");
            }
        }
    }
});
