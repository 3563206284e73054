//! Writes `docs/asyncapi.json` and `docs/openapi.json` from the wire types
//! (`cargo run -p chatsync-protocol --features schema --bin specs`). `tests/specs.rs` fails when the
//! checked-in files differ from what this would write.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    for (name, text) in chatsync_protocol::specs::files() {
        let path = docs.join(name);
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
