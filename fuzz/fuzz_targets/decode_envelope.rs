//! Fuzz target `decode_envelope`: `chatsync_protocol::decode` (client frames) and `decode_server` (server
//! frames) on arbitrary text. Neither may panic; a frame that decodes must re-encode to a frame that
//! decodes to the same value, and a decode error must carry a request id only when it is valid.
#![no_main]

use chatsync_protocol::{decode, decode_server, encode, RequestId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match decode(text) {
        Ok(d) => {
            let again = d.message.encode(d.request_id.as_ref().map(|r| r.as_str()));
            let back = decode(&again).expect("a re-encoded client frame decodes");
            assert_eq!(back, d, "client round trip: {text:?} -> {again:?}");
        }
        Err(e) => {
            if let Some(r) = &e.request_id {
                assert!(RequestId::new(r.as_str()).is_ok());
            }
            let _ = e.to_string();
        }
    }
    if let Ok(incoming) = decode_server(text) {
        let again = encode(&incoming.message, incoming.request_id.as_deref());
        let back = decode_server(&again).expect("a re-encoded server frame decodes");
        assert_eq!(back, incoming, "server round trip: {text:?} -> {again:?}");
    }
});
