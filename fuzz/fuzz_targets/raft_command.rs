//! The coordinator's replicated command (`coord-log`'s `command.rs`) and the Raft log entry
//! around it, as decoded from log records and from peers (bincode).
//!
//! Input: bytes, decoded as a `Command` and as an openraft `Entry`. Properties checked:
//! - decoding never panics, overflows the stack or allocates without bound;
//! - whatever decodes encodes back and decodes to the same value;
//! - the checks run before proposing (`validate`) never panic on a decoded command.

#![no_main]

use coord_log::command::Command;
use coord_log::raft::TypeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = bincode::deserialize::<Command>(data) {
        let bytes = bincode::serialize(&cmd).expect("a decoded command encodes");
        let back: Command = bincode::deserialize(&bytes).expect("an encoded command decodes");
        assert_eq!(back, cmd, "command does not round-trip");
        let _ = coord_log::validate::validate(&cmd, 128);
        let _ = cmd.kind();
    }
    if let Ok(entry) = bincode::deserialize::<openraft::Entry<TypeConfig>>(data) {
        let bytes = bincode::serialize(&entry).expect("a decoded entry encodes");
        let back: openraft::Entry<TypeConfig> =
            bincode::deserialize(&bytes).expect("an encoded entry decodes");
        assert_eq!(back.log_id, entry.log_id);
        assert_eq!(
            bincode::serialize(&back).expect("encodes"),
            bytes,
            "entry does not round-trip"
        );
    }
});
