//! Property tests (proptest) of `chatsync::crypto`: seal → open round trips for any plaintext and any
//! associated data; any single-bit flip, any truncation, or any change of the associated data makes
//! opening fail; wrapped data keys likewise. The fuzz target `open_ciphertext` covers arbitrary input.

use chatsync::crypto::{Aad, DataKey, MasterKey};
use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Debug, Clone)]
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

fn ad() -> impl Strategy<Value = Ad> {
    let s = || "\\PC{0,12}";
    prop_oneof![
        s().prop_map(Ad::Title),
        (s(), s()).prop_map(|(c, m)| Ad::Message(c, m)),
        (s(), s()).prop_map(|(c, u)| Ad::Draft(c, u)),
    ]
}

fn dek() -> &'static DataKey {
    static KEY: std::sync::OnceLock<DataKey> = std::sync::OnceLock::new();
    KEY.get_or_init(DataKey::generate)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn seal_open_round_trip(plain in vec(any::<u8>(), 0..512), ad in ad()) {
        let sealed = dek().encrypt(&plain, &ad.aad());
        prop_assert_eq!(sealed.len(), 1 + 12 + plain.len() + 16);
        prop_assert_eq!(&dek().decrypt(&sealed, &ad.aad()).unwrap()[..], &plain[..]);
    }

    #[test]
    fn any_bit_flip_fails(plain in vec(any::<u8>(), 0..256), ad in ad(), at in any::<usize>(), bit in 0u8..8) {
        let mut sealed = dek().encrypt(&plain, &ad.aad());
        let i = at % sealed.len();
        sealed[i] ^= 1 << bit;
        prop_assert!(dek().decrypt(&sealed, &ad.aad()).is_err(), "flip of bit {} of byte {}", bit, i);
    }

    #[test]
    fn truncation_or_extension_fails(plain in vec(any::<u8>(), 0..256), ad in ad(), cut in any::<usize>(), extra in vec(any::<u8>(), 1..4)) {
        let sealed = dek().encrypt(&plain, &ad.aad());
        prop_assert!(dek().decrypt(&sealed[..cut % sealed.len()], &ad.aad()).is_err());
        let mut longer = sealed.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(dek().decrypt(&longer, &ad.aad()).is_err());
    }

    #[test]
    fn changed_ad_fails(plain in vec(any::<u8>(), 0..256), ad in ad(), other in ad()) {
        prop_assume!(ad.aad() != other.aad());
        let sealed = dek().encrypt(&plain, &ad.aad());
        prop_assert!(dek().decrypt(&sealed, &other.aad()).is_err());
    }

    #[test]
    fn wrapped_keys_are_tamper_evident(key_ref in "\\PC{0,16}", other_ref in "\\PC{0,16}", at in any::<usize>(), bit in 0u8..8) {
        let kek = MasterKey::generate();
        let key = DataKey::generate();
        let wrapped = kek.wrap(&key, &key_ref);
        let opened = kek.unwrap(&wrapped, &key_ref).unwrap();
        let ct = key.encrypt(b"x", &Aad::title("c"));
        prop_assert_eq!(&opened.decrypt(&ct, &Aad::title("c")).unwrap()[..], b"x");
        let mut bad = wrapped.clone();
        bad[at % wrapped.len()] ^= 1 << bit;
        prop_assert!(kek.unwrap(&bad, &key_ref).is_err());
        if other_ref != key_ref {
            prop_assert!(kek.unwrap(&wrapped, &other_ref).is_err());
        }
    }
}
