//! Fuzz target `draft_text`: the draft text extraction and limit check behind `update_draft`
//! (`chatsync::drafts`). The input is a JSON document (or, when it is not one, a text node inside a
//! Tiptap-shaped document). Checks: no panic; the text is trimmed; `check_limits` refuses a document
//! nested deeper than `Limits::MAX_DRAFT_DEPTH` and otherwise agrees with the character and word counts
//! of `draft_text`; a document whose only text node holds `s` has text
//! `s.trim()`; a document decoded from an `update_draft` frame gives the same text as the document itself.
#![no_main]

use chatsync::drafts::{check_limits, draft_text, DraftLimit};
use chatsync_protocol::{decode, object_depth, ClientMessage, Limits};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

fn check(doc: &Map<String, Value>) -> String {
    let text = draft_text(doc);
    assert_eq!(text, text.trim());
    if object_depth(doc) > Limits::MAX_DRAFT_DEPTH {
        // Refused for its depth before its text is counted, whatever the text limits.
        assert_eq!(check_limits(doc, usize::MAX, usize::MAX), Err(DraftLimit::Depth));
        return text;
    }
    let (chars, words) = (text.chars().count(), text.split_whitespace().count());
    assert_eq!(check_limits(doc, chars, words), Ok(()));
    assert_eq!(check_limits(doc, usize::MAX, usize::MAX), Ok(()));
    if chars > 0 {
        assert_eq!(check_limits(doc, chars - 1, usize::MAX), Err(DraftLimit::Chars));
    }
    if words > 0 {
        assert_eq!(check_limits(doc, chars, words - 1), Err(DraftLimit::Words));
    }
    let _ = check_limits(doc, 7_000, 1_000);
    text
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(doc)) => {
            let text = check(&doc);
            let frame = json!({"type": "update_draft", "payload": {"chat_id": "c1", "draft_json": doc}}).to_string();
            if let Ok(decoded) = decode(&frame) {
                let ClientMessage::UpdateDraft(p) = decoded.message else { panic!("wrong type for {frame}") };
                assert_eq!(draft_text(p.draft_json.as_ref().expect("an object draft")), text);
            }
        }
        _ => {
            let doc =
                json!({"type": "doc", "content": [{"type": "paragraph", "content": [{"type": "text", "text": s}]}]});
            let text = check(doc.as_object().expect("an object"));
            assert_eq!(text, s.trim());
        }
    }
});
